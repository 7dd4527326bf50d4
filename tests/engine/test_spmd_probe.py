"""scripts/probe_spmd_step.py: one SPMD program per step gives the per-stage outputs (tiny)."""

import jax
import numpy as np

from scripts import probe_spmd_step as probe


def test_every_variant_matches_per_stage_at_tiny_shapes():
  report = probe.compare(probe.TINY, probe.VARIANTS, multi_steps=3, devices=jax.devices()[:4])
  assert set(report) == set(probe.VARIANTS)
  for name, r in report.items():
    assert set(r["max_abs_diff"]) == {"x_MTD", "k_MLBKCH", "v_MLBKCH"}, name


def test_spmd_step_moves_hidden_states_between_roles():
  """The weights devices' slot buffers are really read: NaN in their mapped slots reaches the
  KV devices' hidden states through the ppermutes, and the spare (unmapped) slots do not."""
  s = probe.TINY
  prob = probe.make_problem(s, seed=1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), (probe.AXIS,))
  clean = probe.Spmd(prob, s, mesh)
  x_MTD = clean.result(clean.step()).x_MTD
  assert np.isfinite(x_MTD).all()  # the NaN spare slots are never read
  poisoned = prob._replace(w_down_MZFD=np.full_like(prob.w_down_MZFD, np.nan))
  bad = probe.Spmd(poisoned, s, mesh)
  assert np.isnan(bad.result(bad.step()).x_MTD).all()
