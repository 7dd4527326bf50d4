"""The simulator's cost model against hand-computed times: a 1-layer toy model's stage FLOPs and
bytes counted here from its dimensions (not from the library's formulas), and the pipelined
step on hand-worked schedules."""

import pytest

from crosspool_jax.models.config import tiny_config
from crosspool_jax.roofline import BatchShape, DeviceSpec
from crosspool_jax.sim.cost_model import (
  CostModel,
  Efficiency,
  ExpertCall,
  colocated_step_s,
  pipelined_step_s,
)

# A device with round figures: 1 TFLOP/s, 1 GB/s HBM, 0.1 GB/s links (1 us latency),
# 0.01 GB/s host link, 10 us launch.
TOY = DeviceSpec("toy", bf16_flops_per_s=1e12, fp8_flops_per_s=None, hbm_bytes_per_s=1e9,
                 memory_bytes=2**30, link_bytes_per_s=1e8, link_latency_s=1e-6,
                 host_bytes_per_s=1e7, dispatch_s=1e-5)


def _toy():
  # D=64, N=4 query heads, K=2 KV heads, H=16, E=8 experts of F=32, top-2, V=512, 1 layer
  return tiny_config("mixtral", num_layers=1)


def _batch():
  """A decode at context 10 and a 4-token prefill chunk from position 0: 5 tokens."""
  return BatchShape.of([1, 4], [10, 4])


def test_batch_shape_counts_keys_by_hand():
  shape = _batch()
  # the decode token sees 10 keys; the chunk's tokens see 1, 2, 3, 4
  assert (shape.seqs, shape.tokens, shape.keys_seen, shape.context) == (2, 5, 20, 14)


def test_one_layer_stages_by_hand():
  cfg, cost = _toy(), CostModel(TOY)
  # attention side: q and o 64x64 each, k and v 64x32 each, router 64x8 -> 12,800 weights
  weights = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 8
  flops = 2 * 5 * weights + 4 * 4 * 16 * 20  # every token through them; QK^T and PV per key
  kv = 2 * 2 * 16 * (14 + 5) * 2  # K and V (bf16) of every key read, of the new ones written
  assert cost.attention_side_s(cfg, 0, _batch()) == pytest.approx(
      max(flops / 1e12, (weights * 2 + kv) / 1e9))
  # experts: 5 tokens x top-2 of 3 x 64 x 32 weights; bytes of the expected distinct experts
  expert = 3 * 64 * 32
  touched = 8 * (1 - (1 - 2 / 8) ** 5)
  assert cost.experts_s(cfg, 0, 5) == pytest.approx(
      max(2 * 5 * 2 * expert / 1e12, touched * expert * 2 / 1e9))
  # head: 64 x 512 once per sequence; embedding rows of the 5 tokens
  head = max(2 * 2 * 64 * 512 / 1e12, (64 * 512 + 5 * 64) * 2 / 1e9)
  assert cost.head_s(cfg, _batch()) == pytest.approx(head)
  # a colocated model step is one program: launch + the stages
  assert cost.model_step_s(cfg, _batch()) == pytest.approx(
      1e-5 + max(flops / 1e12, (weights * 2 + kv) / 1e9) + touched * expert * 2 / 1e9 + head)
  # 5 hidden states of 64 bf16 over a link; 2 experts from the host, then their update program
  assert cost.transfer_s(cfg, 5) == pytest.approx(1e-6 + 5 * 64 * 2 / 1e8)
  assert cost.swap_in_s(2 * expert * 2) == pytest.approx(2 * expert * 2 / 1e7 + 1e-5)
  assert cost.swap_in_s(0) == 0.0
  # a fused call of two members: their work together, one launch
  assert cost.expert_call_s([(cfg, 0, 5), (cfg, 0, 5)]) == pytest.approx(
      1e-5 + 2 * touched * expert * 2 / 1e9)


def test_latent_attention_stage_by_hand():
  # tiny DeepSeek-V2, 1 MoE layer: D=64, N=4 heads, q LoRA 48, query/key heads of 16 + 8 (no
  # rope, rope), values of 12, a latent row of A=32 + R=8, router 64x8, 2 ungated shared
  # experts of 32 (one of 64)
  cfg = tiny_config("deepseek_v2", num_layers=1)
  q = 64 * 48 + 48 * 4 * (16 + 8)  # q LoRA down and up
  kv_a = 64 * (32 + 8)  # the latent row and the rope key
  kv_b = 32 * 4 * (16 + 12)  # W_UK and W_UV
  o = 4 * 12 * 64
  weights = q + kv_a + kv_b + o + 64 * 8 + 3 * 64 * 64
  # absorbed: per head and key a score over the whole row (40) and a value of its latent (32)
  flops = 2 * 5 * weights + 2 * 4 * (40 + 32) * 20
  row = (32 + 8) * (14 + 5) * 2  # one row (bf16) per key read and per new token written
  assert CostModel(TOY).attention_side_s(cfg, 0, _batch()) == pytest.approx(
      max(flops / 1e12, (weights * 2 + row) / 1e9))


def test_efficiency_scales_only_its_stage():
  cfg, batch = _toy(), _batch()
  full, half = CostModel(TOY), CostModel(TOY, efficiency=Efficiency(experts=0.5))
  assert half.experts_s(cfg, 0, 5) == pytest.approx(2 * full.experts_s(cfg, 0, 5))
  assert half.attention_side_s(cfg, 0, batch) == full.attention_side_s(cfg, 0, batch)


def test_multi_step_decode_is_one_program_of_its_steps():
  cfg, cost = _toy(), CostModel(TOY)
  # two sequences at contexts 5 and 8 run 2 and 1 decode steps
  stages = (cost.model_stages_s(cfg, BatchShape.of([1, 1], [5, 8]))
            + cost.model_stages_s(cfg, BatchShape.of([1], [6])))
  assert cost.decode_loop_s(cfg, [5, 8], [2, 1]) == pytest.approx(1e-5 + stages)


def test_fp8_weights_use_the_fp8_peak_where_there_is_one():
  assert CostModel("h100_sxm", weight_dtype="float8_e4m3fn").flops_per_s == 1979e12
  assert CostModel("h100_sxm").flops_per_s == 989e12
  with pytest.raises(ValueError, match="no fp8 peak"):
    CostModel("tpu_v5e", weight_dtype="float8_e4m3fn")


def test_colocated_devices_run_in_parallel_programs_of_one_device_in_sequence():
  assert colocated_step_s([(0, 1.0), (1, 2.5), (0, 2.0)]) == 3.0
  assert colocated_step_s([]) == 0.0


def _one_layer(a, e):
  """m micro-batches on KV device 0, each with its own expert call on weights device 0."""
  calls = [[ExpertCall(0, (i,), e_i) for i, e_i in enumerate(e)]]
  return pipelined_step_s([0] * len(a), [[a_i] for a_i in a], calls, [0.0] * len(a),
                          [0.0] * len(a))


def test_pipeline_one_micro_batch_is_the_sum():
  assert _one_layer([3.0], [5.0]) == 8.0
  # two layers, transfers and the head: nothing overlaps
  calls = [[ExpertCall(0, (0,), 5.0)], [ExpertCall(0, (0,), 7.0)]]
  assert pipelined_step_s([0], [[3.0, 2.0]], calls, [0.5], [1.0]) == 3 + 0.5 + 5 + 0.5 + 2 + 0.5 \
      + 7 + 0.5 + 1


def test_pipeline_equal_stages_pay_the_slower_stage_per_extra_micro_batch():
  # a + e + (m - 1) max(a, e)
  assert _one_layer([2.0] * 3, [2.0] * 3) == 2 + 2 + 2 * 2
  assert _one_layer([1.0] * 4, [3.0] * 4) == 1 + 3 + 3 * 3


def test_pipeline_one_dominant_stage():
  # experts dominate: a_1 + sum(e); attention dominates: sum(a) + e_m
  assert _one_layer([1.0, 1.0, 1.0], [4.0, 4.0, 4.0]) == 1 + 12
  assert _one_layer([4.0, 4.0, 4.0], [1.0, 1.0, 1.0]) == 12 + 1


def test_pipeline_devices_and_swaps():
  # two home KV devices attend at once; their calls queue on the one weights device
  calls = [[ExpertCall(0, (0,), 3.0), ExpertCall(0, (1,), 3.0)]]
  assert pipelined_step_s([0, 1], [[2.0], [2.0]], calls, [0.0, 0.0], [0.0, 0.0]) == 2 + 3 + 3
  # a fused call serves both at once
  fused = [[ExpertCall(0, (0, 1), 4.0)]]
  assert pipelined_step_s([0, 1], [[2.0], [2.0]], fused, [0.0, 0.0], [0.0, 0.0]) == 2 + 4
  # a swap-in starts when the routing is known (attention end) and delays its call
  swap = [[ExpertCall(0, (0,), 3.0, swap_s=4.0)]]
  assert pipelined_step_s([0], [[1.0]], swap, [0.0], [0.0]) == 1 + 4 + 3
  # ... but hides behind a busy weights device: the second call's swap overlaps the first call
  calls = [[ExpertCall(0, (0,), 5.0), ExpertCall(0, (1,), 1.0, swap_s=2.0)]]
  assert pipelined_step_s([0, 1], [[1.0], [1.0]], calls, [0.0, 0.0], [0.0, 0.0]) == 1 + 5 + 1


def test_pipeline_prefetch_delays_its_devices_first_call():
  # swap-ins issued before the step occupy the weights device from the start: its call waits
  # for them; the attention on the KV device runs meanwhile
  call = [[ExpertCall(0, (0,), 3.0)]]
  assert pipelined_step_s([0], [[1.0]], call, [0.0], [0.0], prefetch_s={0: 4.0}) == 4 + 3
  assert pipelined_step_s([0], [[1.0]], call, [0.0], [0.0], prefetch_s={0: 0.5}) == 1 + 3
  # another weights device's prefetch does not delay it
  assert pipelined_step_s([0], [[1.0]], call, [0.0], [0.0], prefetch_s={1: 4.0}) == 1 + 3
  # a load on demand queues behind the prefetch on the device's host link
  swap = [[ExpertCall(0, (0,), 3.0, swap_s=2.0)]]
  assert pipelined_step_s([0], [[1.0]], swap, [0.0], [0.0], prefetch_s={0: 4.0}) == 4 + 2 + 3


def test_a_rerun_charges_the_swap_ins_once():
  cost = CostModel(TOY)
  cost.launch_s(3)
  cost.swap_in_s(10**4)  # one slot-write program and 1 ms at the host link
  cost.transfer_s(_toy(), 5, count=2)
  work = cost.work
  assert (work.programs, work.swaps, work.transfers) == (4, 1, 2)
  work.rerun(reads=3)
  assert (work.programs, work.swaps, work.transfers) == (2 * 3 + 1, 1, 2 * 2 + 3)
  assert work.swap == pytest.approx(10**4 / 1e7)
