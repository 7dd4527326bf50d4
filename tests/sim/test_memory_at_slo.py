"""memory_at_slo.py, run small: what each sweep point plans is checked by hand, and the
memory-at-SLO summary against the runs."""

import pytest

from crosspool_jax.capacity import reference_config
from crosspool_jax.engine.policies.sizes import param_bytes
from crosspool_jax.experiments.report import (
  benchmarks_section,
  meets_slo,
  memory_at_slo_sentences,
  run_memory_bytes,
  smallest_memory_at_slo,
)
from crosspool_jax.experiments.runner import check_experiment, expand_fleet, run_config
from crosspool_jax.sim.experiment import sim_config, simulate_experiment
from tests.sim.test_experiment import experiment_config

OLMOE = reference_config("olmoe-1b-7b")


@pytest.fixture(scope="module")
def memory_smoke():
  return simulate_experiment(experiment_config("memory_at_slo.py", "smoke"),
                             log=lambda msg: None)


def test_memory_at_slo_smoke_plans_each_point_on_8_devices_of_its_gib(memory_smoke):
  """By hand: one OLMoE's weights exceed a device's usable 90 % of 8 GiB, so static and shared
  (whole models on a device) are refused there; crosspool keeps only attention and embeddings
  on its 2 KV devices and the experts on 6 weights devices, so it is served."""
  results = memory_smoke
  assert sum(param_bytes(OLMOE, "bfloat16").values()) > 0.9 * 8 * 2**30
  assert [(r["name"], r["sweep_value"]) for r in results["runs"]] == [
      (name, gib) for gib in (8, 24) for name in ("static", "shared", "crosspool")]
  for run in results["runs"]:
    assert run_memory_bytes(run) == 8 * run["sweep_value"] * 2**30
    refused = run["name"] != "crosspool" and run["sweep_value"] == 8
    assert bool(run.get("refused")) == refused, run["name"]
  crosspool = results["runs"][2]["engine"]
  assert (crosspool["devices"], crosspool["weight_devices"]) == ((0, 1), (2, 3, 4, 5, 6, 7))


def test_memory_at_slo_smoke_summary_is_the_least_passing_point(memory_smoke):
  results = memory_smoke
  slo = results["config"]["slo"]
  best = smallest_memory_at_slo(results)
  for name, run in best.items():
    passing = [r["sweep_value"] for r in results["runs"] if r["name"] == name
               and meets_slo(r, slo)]
    assert (run and run["sweep_value"]) == min(passing, default=None), name
  assert best["static"]["sweep_value"] == 24  # refused at 8
  first = memory_at_slo_sentences(results)[0]
  assert first.startswith("Smallest total accelerator memory meeting the SLO")
  assert "static at 8 x 24 GiB = 192 GiB" in first
  section = benchmarks_section(results, source="x.json")
  assert first in section and "Memory per run at budget.device_gib=8 (the first point):" in section


def test_device_gib_is_device_bytes_in_gib_and_must_not_be_negative():
  config = experiment_config("memory_at_slo.py", "smoke")
  config.unlock()
  expand_fleet(config)
  assert config.budget.device_gib == 80 and not config.budget.device_bytes
  by_gib = run_config(config, "crosspool")[1]
  config.budget.device_gib, config.budget.device_bytes = 0.0, 80 * 2**30
  assert run_config(config, "crosspool")[1] == by_gib
  config.budget.device_gib = -1.0
  with pytest.raises(ValueError, match=r"config.budget.device_gib must be >= 0, got -1.0"):
    check_experiment(sim_config(config))
