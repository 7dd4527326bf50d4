"""The machine's roofline and what a model step needs under it (the benchmarks' shared part).

A step's roofline time is max(FLOPs / peak FLOP/s, bytes / peak bytes/s): the least time the
machine needs to do its arithmetic and move its bytes. A runner's roofline fraction is that
time over its measured time (1.0 = at the roofline). Peaks come from vendor datasheets on GPU /
TPU (`PEAKS`) and are measured in the same process on CPU (`measure_peaks`), so a loaded machine
gets the peaks it has now.

Counts of a decode-style run of one model (`generation_costs`), from its config only:
  FLOPs: 2 per multiply-add of the weight matrices a token goes through (attention
    projections, router, its top_k experts, shared expert or dense MLP; the LM head once per
    sequence and step, since only the last token's logits are needed), plus 4 * N * H per key
    a token attends to per layer (QK^T and PV).
  bytes: every weight matrix read once per step, routed experts only if touched: the expected
    number of distinct experts of a layer under uniform routing, E * (1 - (1 - top_k / E)^T)
    for T tokens (the routing of a real checkpoint is what the model makes of its input, not
    known from the config); embedding rows of the step's tokens; the K/V of every key seen,
    read once per sequence and layer, and the new tokens' K/V written. Norm weights, biases and
    activations are left out (a few rows next to the matrices).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig

# device_kind -> (dense bf16 TFLOP/s, HBM GB/s), vendor datasheet figures (dense, i.e. without
# the 2:4 sparsity factor NVIDIA quotes first). Sources:
#   NVIDIA H100 Tensor Core GPU datasheet: SXM 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3;
#     PCIe 756 TFLOP/s, 2.0 TB/s.
#   NVIDIA H200 Tensor Core GPU datasheet: SXM 989 TFLOP/s, 4.8 TB/s HBM3e (the H200 NVL is
#     835 TFLOP/s, same device_kind: pass the peaks explicitly there).
#   NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s bf16 dense; HBM2 1,555 GB/s (40GB),
#     HBM2e 2,039 GB/s (80GB SXM) / 1,935 GB/s (80GB PCIe).
#   Google Cloud TPU system-architecture pages: v5e 197 TFLOP/s, 819 GB/s; v5p 459 TFLOP/s,
#     2,765 GB/s; v6e (Trillium) 918 TFLOP/s, 1,640 GB/s.
PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA H100 80GB HBM3": (989.0, 3350.0),
    "NVIDIA H100 PCIe": (756.0, 2000.0),
    "NVIDIA H200": (989.0, 4800.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 2039.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 1555.0),
    "NVIDIA A100-PCIE-40GB": (312.0, 1555.0),
    "NVIDIA A100 80GB PCIe": (312.0, 1935.0),
    "TPU v5 lite": (197.0, 819.0),  # v5e
    "TPU v5e": (197.0, 819.0),
    "TPU v5": (459.0, 2765.0),  # v5p
    "TPU v5p": (459.0, 2765.0),
    "TPU v6 lite": (918.0, 1640.0),  # v6e
    "TPU v6e": (918.0, 1640.0),
}


@dataclasses.dataclass(frozen=True)
class Peaks:
  """Peak FLOP/s and memory bytes/s of a device; None where unknown.

  Attributes:
    flops_per_s: peak arithmetic rate.
    bytes_per_s: peak memory bandwidth.
    source: "datasheet" (`PEAKS`), "measured" (`measure_peaks`), "override" (given by the
      caller) or a "+"-joined mix when the two peaks come from different places.
    measurement: what `measure_peaks` recorded, if it ran.
  """

  flops_per_s: float | None
  bytes_per_s: float | None
  source: str
  measurement: dict[str, Any] | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Cost:
  """FLOPs and bytes of some work; `time_s` is its roofline time."""

  flops: float
  bytes: float

  def __add__(self, other: Cost) -> Cost:
    return Cost(self.flops + other.flops, self.bytes + other.bytes)

  def time_s(self, peaks: Peaks) -> float | None:
    """max(flops / peak FLOP/s, bytes / peak bytes/s); None if a peak is unknown."""
    if not peaks.flops_per_s or not peaks.bytes_per_s:
      return None
    return max(self.flops / peaks.flops_per_s, self.bytes / peaks.bytes_per_s)


def _best_and_median(fn, arg, iters: int) -> tuple[float, float]:
  """(fastest, median) wall seconds of `iters` calls of jitted `fn(arg)` after one warm-up."""
  jax.block_until_ready(fn(arg))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(arg))
    times.append(time.perf_counter() - start)
  return min(times), float(np.median(times))


def measure_peaks(*, matmul_dim: int = 1024, stream_mib: int = 256, iters: int = 5,
                  device: jax.Device | None = None) -> Peaks:
  """Measures the device's f32 matmul FLOP/s and memory read bandwidth now.

  FLOP/s: a jitted [n, n] @ [n, n] f32 matmul (2 n^3 FLOPs). Bandwidth: a jitted sum of a
  `stream_mib` MiB f32 array (read once; larger than the caches). The peaks are the fastest of
  `iters` calls (a peak is what the machine can do; the medians are recorded too).

  Args:
    matmul_dim: n.
    stream_mib: size of the streamed array in MiB.
    iters: timed calls of each.
    device: where to run (default: the first device).

  Returns:
    `Peaks` with source "measured" and the raw figures under `measurement`.
  """
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((matmul_dim, matmul_dim), jnp.float32), device)
  mm_best, mm_median = _best_and_median(jax.jit(lambda a: a @ a), a, iters)
  del a
  n = stream_mib * 2 ** 20 // 4
  x = jax.device_put(jnp.ones((n,), jnp.float32), device)
  rd_best, rd_median = _best_and_median(jax.jit(jnp.sum), x, iters)
  del x
  flops, nbytes = 2 * matmul_dim ** 3, n * 4
  measurement = {"matmul_dim": matmul_dim, "stream_mib": stream_mib, "iters": iters,
                 "matmul_best_s": mm_best, "matmul_median_s": mm_median,
                 "stream_best_s": rd_best, "stream_median_s": rd_median,
                 "median_flops_per_s": flops / mm_median, "median_bytes_per_s": nbytes / rd_median}
  return Peaks(flops / mm_best, nbytes / rd_best, "measured", measurement)


def device_peaks(device_kind: str, backend: str, *, peak_tflops: float | None = None,
                 peak_gbps: float | None = None, measure=measure_peaks) -> Peaks:
  """The peaks of a device: overrides, else the datasheet table, else measured on CPU.

  Args:
    device_kind: `jax.Device.device_kind` (the `PEAKS` key).
    backend: "cpu", "gpu" or "tpu"; only a CPU is measured (an accelerator missing from
      `PEAKS` gets None, unless overridden).
    peak_tflops, peak_gbps: overrides (TFLOP/s, GB/s); each replaces its own peak.
    measure: () -> Peaks, called only when a CPU peak is needed.

  Returns:
    `Peaks` (FLOP/s and bytes/s, not tera / giga).
  """
  sources = []
  table = PEAKS.get(device_kind)
  measured = None
  if table:
    flops, nbytes = table[0] * 1e12, table[1] * 1e9
    sources.append("datasheet")
  elif backend == "cpu" and (peak_tflops is None or peak_gbps is None):
    measured = measure()
    flops, nbytes = measured.flops_per_s, measured.bytes_per_s
    sources.append("measured")
  else:
    flops = nbytes = None
  if peak_tflops is not None or peak_gbps is not None:
    sources.append("override")
  flops = flops if peak_tflops is None else peak_tflops * 1e12
  nbytes = nbytes if peak_gbps is None else peak_gbps * 1e9
  return Peaks(flops, nbytes, "+".join(sources) or "unknown",
               measured.measurement if measured else None)


def _layer_matrices(cfg: ModelConfig, layer: int) -> tuple[int, int]:
  """(weights every token of the layer uses, weights of one routed expert) of a layer."""
  D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  shared = 2 * D * N * H + 2 * D * K * H
  if not cfg.moe_layers[layer]:
    return shared + 3 * D * cfg.d_ff_dense, 0
  shared += D * cfg.num_experts
  if cfg.d_ff_shared:
    shared += 3 * D * cfg.d_ff_shared + D
  return shared, 3 * D * cfg.d_ff_expert


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
  """Distinct experts T tokens reach when each picks top_k of E uniformly: E (1 - (1-k/E)^T)."""
  return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def step_cost(cfg: ModelConfig, *, seqs: int, new_tokens: int, context: int,
              weight_bytes: int, kv_bytes: int) -> Cost:
  """FLOPs and bytes of one step of `seqs` sequences alike (see the module docstring).

  Args:
    cfg: the model.
    seqs: sequences in the step.
    new_tokens: tokens each sequence feeds (the prompt for a prefill, 1 for a decode step).
    context: each sequence's context after the step (its new tokens included).
    weight_bytes: bytes per weight (the params' dtype).
    kv_bytes: bytes per K/V element (the cache's dtype).

  Returns:
    The step's `Cost`.
  """
  tokens = seqs * new_tokens
  D, N, K, H, V = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  # Keys a sequence's new tokens see in all: sum over positions p of (p + 1).
  keys_seen = seqs * sum(range(context - new_tokens + 1, context + 1))
  touched = expected_experts_touched(cfg.num_experts, cfg.top_k, tokens)
  flops = 2.0 * seqs * D * V + 4.0 * N * H * keys_seen * cfg.num_layers
  weights = D * V + tokens * D  # LM head, embedding rows
  for layer in range(cfg.num_layers):
    shared, expert = _layer_matrices(cfg, layer)
    flops += 2.0 * tokens * (shared + cfg.top_k * expert)
    weights += shared + touched * expert
  kv = 2 * K * H * cfg.num_layers * (seqs * context + tokens)  # read every key, write the new
  return Cost(flops, weights * weight_bytes + kv * kv_bytes)


def generation_costs(cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int,
                     weight_bytes: int, kv_bytes: int) -> list[Cost]:
  """Steps of greedy generation of `new_tokens` per row for `batch` rows of `prompt_len`.

  One prefill step (which yields the first new token), then new_tokens - 1 decode steps.
  """
  kw = dict(seqs=batch, weight_bytes=weight_bytes, kv_bytes=kv_bytes)
  costs = [step_cost(cfg, new_tokens=prompt_len, context=prompt_len, **kw)]
  costs += [step_cost(cfg, new_tokens=1, context=prompt_len + i, **kw)
            for i in range(1, new_tokens)]
  return costs


def total(costs: Sequence[Cost]) -> Cost:
  """The sum of some costs."""
  return sum(costs, Cost(0.0, 0.0))


def roofline_s(costs: Sequence[Cost], peaks: Peaks) -> float | None:
  """Sum of the steps' roofline times (each step bound on its own); None if a peak is unknown."""
  times = [c.time_s(peaks) for c in costs]
  return None if any(t is None for t in times) else sum(times)
