"""crosspool_jax.roofline: peaks (table, overrides, measured) and step costs, the latter checked
against the parameter tree of the real model (not the formulas of the module)."""

import math

import pytest

from crosspool_jax import roofline
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import abstract_params


def _sizes_from_params(cfg):
  """(weights each token multiplies, weights of one routed expert, LM head) per the params."""
  params = abstract_params(cfg)
  per_token, expert = 0, 0
  for layer in params["layers"].values():
    attn, ffn = layer["attn"], layer["ffn"]
    per_token += sum(attn[k].size for k in ("w_q_DNH", "w_k_DKH", "w_v_DKH", "w_o_NHD"))
    if "w_router_DE" in ffn:
      per_token += ffn["w_router_DE"].size + sum(
          ffn[k].size for k in ffn if k.startswith("shared_"))
      expert = sum(ffn[k].size // cfg.num_experts for k in ("w_gate_EDF", "w_up_EDF",
                                                            "w_down_EFD"))
    else:
      per_token += sum(ffn[k].size for k in ("w_gate_DF", "w_up_DF", "w_down_FD"))
  return per_token, expert, params["lm_head_DV"].size


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_decode_step_cost_counts_the_model_weights(family):
  """One decode step of 3 sequences at context 10: FLOPs and bytes from the param shapes."""
  cfg = tiny_config(family)
  per_token, expert, head = _sizes_from_params(cfg)
  moe_layers = sum(cfg.moe_layers)
  cost = roofline.step_cost(cfg, seqs=3, new_tokens=1, context=10, weight_bytes=2, kv_bytes=4)
  attn_flops = 4 * cfg.num_heads * cfg.head_dim * 3 * 10 * cfg.num_layers  # 10 keys each
  assert cost.flops == pytest.approx(2 * 3 * (per_token + cfg.top_k * expert * moe_layers)
                                     + 2 * 3 * head + attn_flops)
  touched = cfg.num_experts * (1 - (1 - cfg.top_k / cfg.num_experts) ** 3)
  weights = per_token + touched * expert * moe_layers + head + 3 * cfg.d_model
  kv = 2 * cfg.num_kv_heads * cfg.head_dim * cfg.num_layers * (3 * 10 + 3)
  assert cost.bytes == pytest.approx(2 * weights + 4 * kv)


def test_prefill_counts_every_token_and_the_head_once_per_sequence():
  cfg = tiny_config("mixtral")
  per_token, expert, head = _sizes_from_params(cfg)
  cost = roofline.step_cost(cfg, seqs=2, new_tokens=5, context=5, weight_bytes=4, kv_bytes=4)
  keys = 2 * (1 + 2 + 3 + 4 + 5)  # causal: token i of a chunk sees i + 1 keys
  assert cost.flops == pytest.approx(
      2 * 10 * (per_token + cfg.top_k * expert * cfg.num_layers) + 2 * 2 * head
      + 4 * cfg.num_heads * cfg.head_dim * keys * cfg.num_layers)


def test_generation_costs_are_a_prefill_then_decode_steps():
  cfg = tiny_config("mixtral")
  kw = dict(weight_bytes=4, kv_bytes=4)
  costs = roofline.generation_costs(cfg, batch=2, prompt_len=6, new_tokens=4, **kw)
  assert costs == [roofline.step_cost(cfg, seqs=2, new_tokens=6, context=6, **kw)] + [
      roofline.step_cost(cfg, seqs=2, new_tokens=1, context=c, **kw) for c in (7, 8, 9)]
  total = roofline.total(costs)
  assert total.flops == pytest.approx(sum(c.flops for c in costs))
  peaks = roofline.Peaks(1e9, 1e9, "test")
  assert roofline.roofline_s(costs, peaks) == pytest.approx(sum(c.time_s(peaks) for c in costs))


def test_expected_experts_touched_by_hand():
  assert roofline.expected_experts_touched(16, 4, 1) == 4
  assert roofline.expected_experts_touched(2, 1, 2) == 1.5  # both tokens alike with p 1/2
  assert roofline.expected_experts_touched(16, 4, 0) == 0
  assert 15.99 < roofline.expected_experts_touched(16, 4, 32) < 16


def test_cost_time_is_the_slower_of_flops_and_bytes():
  peaks = roofline.Peaks(100.0, 10.0, "test")
  assert roofline.Cost(1000, 50).time_s(peaks) == 10.0  # compute-bound
  assert roofline.Cost(100, 50).time_s(peaks) == 5.0  # memory-bound
  assert roofline.Cost(1, 1).time_s(roofline.Peaks(None, 10.0, "unknown")) is None
  assert roofline.roofline_s([roofline.Cost(1, 1)], roofline.Peaks(1.0, None, "x")) is None


def test_device_peaks_sources():
  def measure():
    raise AssertionError("must not measure")

  h100 = roofline.device_peaks("NVIDIA H100 80GB HBM3", "gpu", measure=measure)
  assert (h100.flops_per_s, h100.bytes_per_s, h100.source) == (989e12, 3350e9, "datasheet")
  mixed = roofline.device_peaks("TPU v5e", "tpu", peak_gbps=700.0, measure=measure)
  assert (mixed.flops_per_s, mixed.bytes_per_s, mixed.source) == (197e12, 700e9,
                                                                  "datasheet+override")
  unknown = roofline.device_peaks("Some GPU", "gpu", measure=measure)
  assert (unknown.flops_per_s, unknown.bytes_per_s, unknown.source) == (None, None, "unknown")
  given = roofline.device_peaks("cpu", "cpu", peak_tflops=1.0, peak_gbps=2.0, measure=measure)
  assert (given.flops_per_s, given.bytes_per_s, given.source) == (1e12, 2e9, "override")
  fake = roofline.Peaks(5e10, 3e10, "measured", {"matmul_dim": 8})
  cpu = roofline.device_peaks("cpu", "cpu", peak_gbps=20.0, measure=lambda: fake)
  assert (cpu.flops_per_s, cpu.bytes_per_s, cpu.source) == (5e10, 20e9, "measured+override")
  assert cpu.measurement == {"matmul_dim": 8}


def test_measure_peaks_on_this_machine():
  peaks = roofline.measure_peaks(matmul_dim=64, stream_mib=1, iters=2)
  m = peaks.measurement
  assert peaks.source == "measured"
  assert math.isclose(peaks.flops_per_s, 2 * 64 ** 3 / m["matmul_best_s"])
  assert math.isclose(peaks.bytes_per_s, 2 ** 20 / m["stream_best_s"])
  assert m["matmul_best_s"] <= m["matmul_median_s"] and m["stream_best_s"] <= m["stream_median_s"]
  assert peaks.to_json()["source"] == "measured"
