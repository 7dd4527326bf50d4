"""The equal-budget plan of each policy, against the bytes of real parameter arrays."""

import jax
import pytest

from crosspool_jax.experiments.budget import FleetModel, plan_policy
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import init_params

PAGE_ELEMS, PAGE_BYTES = 512, 2048  # float32 pages
EXPERT_KEYS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


def _fleet():
  cfgs = {"a": tiny_config("mixtral"), "b": tiny_config("qwen2_moe"),
          "c": tiny_config("olmoe", num_experts=16)}
  return {m: FleetModel(cfg, "float32", 2, 512) for m, cfg in cfgs.items()}, cfgs


def _bytes(cfg):
  """(all params, routed experts) in bytes, counted on the arrays init_params builds."""
  params = init_params(cfg, seed=0)
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  experts = sum(layer["ffn"][k].nbytes for layer in params["layers"].values()
                for k in EXPERT_KEYS if k in layer["ffn"])
  return total, experts


def test_colocated_pages_are_what_the_most_loaded_device_leaves():
  fleet, cfgs = _fleet()
  sizes = {m: _bytes(cfg) for m, cfg in cfgs.items()}
  budget = 4 * 2**20
  plan = plan_policy(fleet, policy="shared", kv_devices=2, device_bytes=budget,
                     page_elems=PAGE_ELEMS, kv_dtype="float32")
  assert plan.groups == {"a": 0, "b": 1, "c": 0}  # round robin in fleet order
  resident = [sizes["a"][0] + sizes["c"][0], sizes["b"][0]]
  assert plan.accounting["resident_bytes_per_kv_device"] == resident
  assert plan.pages_per_device == min((budget - r) // PAGE_BYTES for r in resident)
  assert plan.max_context == {"a": 512, "b": 512, "c": 512}  # shared: no cap
  # One request of "a" may take the whole device pool: (pages - 1) // layers pages of 8 tokens.
  assert plan.accounting["longest_context_budget"]["a"] == min(
      512, (plan.pages_per_device - 1) // 2 * 8)


def test_static_caps_the_context_at_an_equal_share_of_its_device():
  fleet, _ = _fleet()
  plan = plan_policy(fleet, policy="static", kv_devices=2, device_bytes=2 * 2**20,
                     page_elems=PAGE_ELEMS, kv_dtype="float32")
  share = (plan.pages_per_device - 1) // 2  # "a" and "c" share device 0
  # page tokens: mixtral 2x16 heads -> 8, olmoe 4x16 -> 4; layers 2; max_batch 2
  assert plan.max_context["a"] == min(512, share // (2 * 2) * 8)
  assert plan.max_context["c"] == min(512, share // (2 * 2) * 4)
  assert plan.max_context["a"] < 512  # the budget is tight enough to bind
  assert plan.accounting["longest_context_budget"]["a"] == plan.max_context["a"]


def test_crosspool_keeps_non_expert_weights_on_kv_devices_and_experts_in_slots():
  fleet, cfgs = _fleet()
  sizes = {m: _bytes(cfg) for m, cfg in cfgs.items()}
  budget = 2 * 2**20
  plan = plan_policy(fleet, policy="crosspool", kv_devices=2, weight_devices=2,
                     device_bytes=budget, page_elems=PAGE_ELEMS, kv_dtype="float32")
  non_expert = {m: t - e for m, (t, e) in sizes.items()}
  resident = [non_expert["a"] + non_expert["c"], non_expert["b"]]
  assert plan.accounting["resident_bytes_per_kv_device"] == resident
  assert plan.pages_per_device == min((budget - r) // PAGE_BYTES for r in resident)
  # One shape class (d_model 64, d_ff 32, f32): expert = 3 * 64 * 32 * 4 bytes.
  expert = 3 * 64 * 32 * 4
  pooled = 2 * 8 + 2 * 8 + 2 * 16  # MoE layers x experts: mixtral, qwen2_moe, olmoe
  assert sizes["a"][1] == 2 * 8 * expert
  assert plan.expert_slots_per_device == min(budget // expert, -(-pooled // 2))
  fraction = next(iter(plan.accounting["resident_expert_fraction"].values()))
  assert fraction == min(1.0, 2 * plan.expert_slots_per_device / pooled)
  # A sequence may spread over both KV devices.
  assert plan.accounting["longest_context_budget"]["a"] == min(
      512, 2 * (plan.pages_per_device - 1) // 2 * 8)


def test_partitioned_slots_are_per_model():
  fleet, _ = _fleet()
  expert = 3 * 64 * 32 * 4
  # One weights device with room for 20 slots of each of the 3 models' own classes.
  kw = dict(kv_devices=2, weight_devices=1, device_bytes=2 * 2**20, page_elems=PAGE_ELEMS,
            kv_dtype="float32", weights_device_bytes=20 * 3 * expert)
  plan = plan_policy(fleet, policy="crosspool_partitioned", **kw)
  assert plan.expert_slots_per_device == 20
  assert plan.accounting["expert_bytes_per_weights_device"] == 20 * 3 * expert
  # Both MoE layers of each model on the one weights device: 16, 16 and 32 experts.
  assert sorted(plan.accounting["resident_expert_fraction"].values()) == [20 / 32, 1.0, 1.0]
  assert plan.accounting["resident_experts"] == 16 + 16 + 20
  consolidated = plan_policy(fleet, policy="crosspool", **kw)
  assert consolidated.expert_slots_per_device == 60  # one class shared by the 64 experts
  assert consolidated.accounting["resident_experts"] == 60
  assert consolidated.groups == plan.groups  # the same placement rule
  assert consolidated.pages_per_device == plan.pages_per_device


def test_weights_pool_smaller_than_one_layers_experts_is_refused():
  # Experts of 3 x 64 x 4096 x 4 B = 3 MiB: a 4 MiB device holds one, a layer has 8.
  fleet = {"big": FleetModel(tiny_config("mixtral", d_ff_expert=4096), "float32", 2, 512)}
  with pytest.raises(ValueError, match=r"budget: crosspool: model 'big' does not fit: a weights "
                                       r"device of 4194304 B holds 1 slot\(s\) per shape class, "
                                       r"fewer than num_experts=8"):
    plan_policy(fleet, policy="crosspool", kv_devices=1, weight_devices=1,
                device_bytes=4 * 2**20, page_elems=PAGE_ELEMS, kv_dtype="float32")


@pytest.mark.parametrize("policy", ["static", "shared", "crosspool", "crosspool_partitioned"])
def test_budget_smaller_than_the_weights_names_the_model(policy):
  fleet, cfgs = _fleet()
  total, experts = _bytes(cfgs["a"])
  resident = total if policy in ("static", "shared") else total - experts
  where = "all 2 devices" if policy in ("static", "shared") else "one device"
  with pytest.raises(ValueError, match=rf"budget: {policy}: model 'a' does not fit: weights "
                                       rf"{resident} B do not fit on {where} of 262144 B"):
    plan_policy(fleet, policy=policy, kv_devices=2, weight_devices=1, device_bytes=2**18,
                page_elems=PAGE_ELEMS, kv_dtype="float32")


def test_weights_that_need_two_devices_are_not_served():
  fleet, cfgs = _fleet()
  total = _bytes(cfgs["a"])[0]
  # a's weights fit two devices (split) with pages to spare, not one: the engine has no
  # tensor parallelism, the plan says so.
  with pytest.raises(ValueError, match="model 'a' needs its weights split over 2 devices"):
    plan_policy({"a": fleet["a"]}, policy="shared", kv_devices=2, device_bytes=total // 2 + 2**14,
                page_elems=PAGE_ELEMS, kv_dtype="float32")


def test_pages_that_do_not_match_a_kv_shape_are_refused():
  fleet, _ = _fleet()
  with pytest.raises(ValueError, match="page_elems=96 is not a multiple"):
    plan_policy(fleet, policy="static", kv_devices=1, device_bytes=2**24, page_elems=96,
                kv_dtype="float32")
