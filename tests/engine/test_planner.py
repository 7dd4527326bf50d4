"""The KV planner of the crosspool policies, and every policy's stranded bytes.

Tiny mixtral (float32): non-expert weights 365824 B, experts of 3 x 64 x 32 x 4 = 24576 B,
8 experts in each of 2 MoE layers. Pages of 512 float32 elements (2048 B, 8 tokens a layer).
"""

import math

import numpy as np
import pytest

from crosspool_jax.capacity import measure_capacity, reference_config
from crosspool_jax.engine.policies import POLICIES, Budget, FleetModel, get_policy
from crosspool_jax.engine.policies.placement import usable_bytes
from crosspool_jax.experiments.budget import plan_policy
from crosspool_jax.models.config import tiny_config

NON_EXPERT, EXPERT, PAGE_ELEMS, PAGE = 365824, 24576, 512, 2048


def _fleet(n, **overrides):
  return {f"m{i}": FleetModel(tiny_config("mixtral", **overrides), "float32", 2, 512)
          for i in range(n)}


@pytest.mark.parametrize("policy", ["crosspool", "crosspool_partitioned"])
def test_planner_picks_the_split_brute_force_says(policy):
  models, devices = 3, 4
  device = 3 * NON_EXPERT + 40 * PAGE
  classes = 1 if policy == "crosspool" else models  # partitioned: a class per model

  def usable_pages(w):  # identical models, least loaded first: ceil(3 / kv) on the fullest
    kv = devices - w
    return kv * ((device - math.ceil(models / kv) * NON_EXPERT) // PAGE - 1)

  pages = {w: usable_pages(w) for w in range(1, devices)}
  best = max(pages, key=lambda w: (pages[w], -w))
  plan = plan_policy(_fleet(models), policy=policy, kv_devices=2, weight_devices=2,
                     device_bytes=device, page_elems=PAGE_ELEMS, kv_dtype="float32",
                     kv_planner=True)
  a = plan.accounting
  assert a["kv_planner"]["usable_kv_pages"] == {str(w): p for w, p in pages.items()}
  assert (a["weight_devices"], a["kv_devices"]) == (best, devices - best)
  assert a["kv_devices"] * (plan.pages_per_device - 1) == pages[best]
  # Slots fill the weights device: all it holds of a slot per class, less than one left.
  slots = device // (classes * EXPERT)
  assert plan.expert_slots_per_device == slots
  assert a["stranded_bytes_per_weights_device"] == [device - slots * classes * EXPERT] * best
  # KV devices: weights, the equal buffer, the rest stranded.
  loads = a["resident_bytes_per_kv_device"]
  assert a["stranded_bytes_per_kv_device"] == [device - r - plan.pages_per_device * PAGE
                                               for r in loads]
  assert a["stranded_bytes"] == (sum(a["stranded_bytes_per_kv_device"])
                                 + sum(a["stranded_bytes_per_weights_device"]))


def test_without_the_planner_the_split_is_as_given_and_slots_stop_at_residency():
  device = 3 * NON_EXPERT + 40 * PAGE
  plan = plan_policy(_fleet(3), policy="crosspool", kv_devices=2, weight_devices=2,
                     device_bytes=device, page_elems=PAGE_ELEMS, kv_dtype="float32")
  a = plan.accounting
  assert (a["weight_devices"], a["kv_devices"]) == (2, 2) and "kv_planner" not in a
  # 3 models x 2 layers x 8 experts, one layer of each model per weights device: 24 slots.
  assert plan.expert_slots_per_device == 24
  assert a["stranded_bytes_per_weights_device"] == [device - 24 * EXPERT] * 2


@pytest.mark.parametrize("seed", range(6))
def test_every_byte_is_weights_a_buffer_a_slot_or_stranded(seed):
  rng = np.random.default_rng(seed)
  fleet = {f"m{i}": FleetModel(tiny_config("mixtral", d_ff_expert=int(d)), "float32", 2, 512)
           for i, d in enumerate(rng.choice([32, 64, 96], size=rng.integers(2, 6)))}
  devices = int(rng.integers(2, 6))
  device = int(rng.integers(3 * NON_EXPERT, 6 * NON_EXPERT))
  reserve = float(rng.choice([0.0, 0.1]))
  for name in POLICIES:
    policy = get_policy(name)
    planner = policy.pools_experts
    plan = policy.plan(fleet, Budget(device_bytes=device, page_elems=PAGE_ELEMS,
                                     kv_dtype="float32", kv_devices=devices - planner,
                                     weight_devices=int(planner), reserve_fraction=reserve,
                                     kv_planner=planner))
    a, usable = plan.accounting, int(usable_bytes(device, reserve))
    buffers = set(a["kv_buffer_devices"])
    for d, (r, s) in enumerate(zip(a["resident_bytes_per_kv_device"],
                                   a["stranded_bytes_per_kv_device"], strict=True)):
      assert r + (plan.pages_per_device * PAGE if d in buffers else 0) + s == usable, name
      if d in buffers:  # the equal buffer: less than a page beyond the fullest device's load
        assert 0 <= s < PAGE + max(a["resident_bytes_per_kv_device"]) - r, name
    assert min(a["stranded_bytes_per_kv_device"][d] for d in buffers) < PAGE, name
    if planner and plan.expert_slots_per_device is not None:  # less than one slot of each class
      slot = a["expert_bytes_per_weights_device"] // plan.expert_slots_per_device
      assert all(0 <= s < slot for s in a["stranded_bytes_per_weights_device"]), name


def test_infeasible_budgets_name_what_does_not_fit():
  # Experts of 3 x 64 x 4096 x 4 B = 3 MiB: a 4 MiB weights device holds 1, a layer has 8.
  fleet = {"big": FleetModel(tiny_config("mixtral", d_ff_expert=4096), "float32", 2, 512)}
  with pytest.raises(ValueError, match=r"budget: crosspool: model 'big' does not fit: no split "
                                       r"of 3 devices serves it; with 1 weights device\(s\): a "
                                       r"weights device of 4194304 B holds 1 slot\(s\) per shape "
                                       r"class, fewer than num_experts=8"):
    plan_policy(fleet, policy="crosspool", kv_devices=2, weight_devices=1,
                device_bytes=4 * 2**20, page_elems=PAGE_ELEMS, kv_dtype="float32",
                kv_planner=True)
  with pytest.raises(ValueError, match="the KV planner needs at least 2 devices"):
    plan_policy(_fleet(1), policy="crosspool", kv_devices=1, device_bytes=4 * 2**20,
                page_elems=PAGE_ELEMS, kv_dtype="float32", kv_planner=True)
  with pytest.raises(ValueError, match="the planner chooses W, give one or the other"):
    measure_capacity([tiny_config("mixtral")], num_devices=2, device_bytes=4 * 2**20,
                     page_bytes=PAGE, dtype="float32", max_batch=2, kv_planner=True,
                     crosspool_weight_devices=1)


def test_planner_holds_at_least_as_much_kv_on_the_qwen_fleet():
  kw = dict(num_devices=8, device_bytes=80 * 2**30, page_bytes=256 * 1024, dtype="bfloat16",
            max_batch=16, organisations=("crosspool",))
  fleet = [reference_config("qwen1.5-moe-a2.7b")] * 8
  before, after = (measure_capacity(fleet, kv_planner=p, **kw)["organisations"]["crosspool"]
                   for p in (False, True))
  assert after["kv_pages"] >= before["kv_pages"]
  assert after["fleet_fill_tokens"] >= before["fleet_fill_tokens"]
  for m, rec in after["models"].items():
    assert rec["closed_form_agrees"]
    assert rec["longest_context_raw"] >= before["models"][m]["longest_context_raw"]
  slot = after["weights_pool"]["slot_bytes_per_device"] // after["weights_pool"][
      "slots_per_device"]
  assert all(s < slot for s in after["stranded_bytes_per_device"]["weights"])
