"""The machine's roofline and what a model step needs under it (the benchmarks' shared part).

A step's roofline time is max(FLOPs / peak FLOP/s, bytes / peak bytes/s): the least time the
machine needs to do its arithmetic and move its bytes. A runner's roofline fraction is that
time over its measured time (1.0 = at the roofline). Peaks come from vendor datasheets on GPU /
TPU (`PEAKS`) and are measured in the same process on CPU (`measure_peaks`), so a loaded machine
gets the peaks it has now.

Counts of a decode-style run of one model (`generation_costs`), from its config only:
  FLOPs: 2 per multiply-add of the weight matrices a token goes through (attention
    projections, router, its top_k experts, shared expert or dense MLP; the LM head once per
    sequence and step, since only the last token's logits are needed), plus, per key a token
    attends to per layer, 4 * N * H (QK^T and PV) or, with latent attention,
    2 * N * (2 * kv_lora_rank + qk_rope) (`attention_flops_per_key`).
  bytes: every weight matrix read once per step, routed experts only if touched: the expected
    number of distinct experts of a layer under uniform routing, E * (1 - (1 - top_k / E)^T)
    for T tokens (the routing of a real checkpoint is what the model makes of its input, not
    known from the config); embedding rows of the step's tokens; the K/V of every key seen
    (or its latent row), read once per sequence and layer, and the new tokens' written. Norm
    weights, biases and activations are left out (a few rows next to the matrices).

Latent attention (the DeepSeek families) is counted in the absorbed form, the one the engine
runs on its pages for every token (`stages.attention_inputs(absorbed=True)`): the projections
of `config.attention_matrices` once per token (q_nope into the latent space through W_UK, the
latent output out through W_UV), a score over each key's whole row (kv_lora_rank + qk_rope)
and a value of its latent part (kv_lora_rank) per head, and the row (`kv_stores` 1, one KV
head of `head_dim` = the row) read per key.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig, attention_matrices

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """One accelerator kind: datasheet peaks, memory, links and launch overhead (per device).

  Attributes:
    name: the short name (a `DEVICES` key).
    bf16_flops_per_s: dense bf16 peak (without the 2:4 sparsity factor NVIDIA quotes first).
    fp8_flops_per_s: dense fp8 peak, None where the device has no fp8 datasheet figure.
    hbm_bytes_per_s: memory bandwidth.
    memory_bytes: device memory (the datasheet's GB taken as GiB: HBM stacks come in binary
      sizes, and the capacity analysis budgets devices in GiB).
    link_bytes_per_s: device-to-device bandwidth per direction (NVLink, ICI).
    link_latency_s: latency of one device-to-device transfer (an estimate, no datasheet).
    host_bytes_per_s: host-to-device bandwidth per direction (PCIe): expert swap-ins.
    dispatch_s: host overhead of launching one program (an estimate, no datasheet).
    device_kinds: the `jax.Device.device_kind` strings of this device (`PEAKS` keys).
    shared_host: the devices are emulated on one host's cores (CPU devices): their programs
      do not overlap, so a step costs the sum of its programs (`crosspool_jax.sim`).
  """

  name: str
  bf16_flops_per_s: float
  fp8_flops_per_s: float | None
  hbm_bytes_per_s: float
  memory_bytes: int
  link_bytes_per_s: float
  link_latency_s: float
  host_bytes_per_s: float
  dispatch_s: float
  device_kinds: tuple[str, ...] = ()
  shared_host: bool = False

  def flops_per_s(self, dtype: str) -> float:
    """The peak for matmuls in `dtype`: fp8 for float8 types, else the bf16 peak."""
    if not dtype.startswith("float8"):
      return self.bf16_flops_per_s
    if self.fp8_flops_per_s is None:
      raise ValueError(f"device {self.name!r} has no fp8 peak (dtype {dtype!r}); use bfloat16")
    return self.fp8_flops_per_s


def _nvidia(name, bf16_tflops, fp8_tflops, hbm_gbps, memory_gib, nvlink_gbps, pcie_gbps,
            device_kinds):
  """An NVIDIA GPU: NVLink and PCIe figures are the datasheets' bidirectional totals, halved
  (per direction); launch ~5 us and NVLink latency ~3 us (estimates)."""
  return DeviceSpec(name, bf16_tflops * 1e12, fp8_tflops and fp8_tflops * 1e12, hbm_gbps * 1e9,
                    memory_gib * GIB, nvlink_gbps / 2 * 1e9, 3e-6, pcie_gbps / 2 * 1e9, 5e-6,
                    device_kinds)


def _tpu(name, bf16_tflops, hbm_gbps, memory_gib, ici_gbits, device_kinds):
  """A Cloud TPU: ICI is the per-chip figure of Google's page (Gbit/s), taken as the bandwidth
  of one transfer; the pages give no host-link figure, so PCIe Gen4 x16 (32 GB/s per
  direction) is assumed; launch ~20 us and ICI latency ~5 us (estimates). No fp8 figure (the
  pages quote int8)."""
  return DeviceSpec(name, bf16_tflops * 1e12, None, hbm_gbps * 1e9, memory_gib * GIB,
                    ici_gbits / 8 * 1e9, 5e-6, 32e9, 20e-6, device_kinds)


# The one table of device figures (the benchmarks' roofline peaks, `PEAKS`, and the
# simulator's cost model both read it). Sources, by vendor page name:
#   NVIDIA H100 Tensor Core GPU datasheet: SXM 989 TFLOP/s bf16 dense, 1,979 fp8, 3.35 TB/s
#     HBM3, 80 GB, NVLink 900 GB/s, PCIe Gen5 128 GB/s; PCIe card 756 / 1,513 TFLOP/s,
#     2.0 TB/s, 80 GB, NVLink bridge 600 GB/s, PCIe Gen5 128 GB/s.
#   NVIDIA H200 Tensor Core GPU datasheet: SXM 989 / 1,979 TFLOP/s, 4.8 TB/s HBM3e, 141 GB,
#     NVLink 900 GB/s, PCIe Gen5 128 GB/s (the H200 NVL is 835 TFLOP/s, same device_kind:
#     pass the peaks explicitly there).
#   NVIDIA DGX B200 / HGX B200 datasheets, per GPU (the 8-GPU totals / 8, sparsity halved):
#     2.25 PFLOP/s bf16 dense, 4.5 fp8, 8 TB/s HBM3e, 180 GB, NVLink 5 1.8 TB/s, PCIe Gen5.
#   NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s bf16 dense (no fp8); HBM2 1,555 GB/s
#     (40GB), HBM2e 2,039 GB/s (80GB SXM) / 1,935 GB/s (80GB PCIe); NVLink 600 GB/s (PCIe
#     cards: NVLink bridge 600 GB/s); PCIe Gen4 64 GB/s.
#   Google Cloud TPU system-architecture pages: v5e 197 TFLOP/s bf16, 819 GB/s, 16 GB HBM,
#     ICI 1,600 Gbps; v5p 459 TFLOP/s, 2,765 GB/s, 95 GB, ICI 4,800 Gbps; v6e (Trillium)
#     918 TFLOP/s, 1,640 GB/s, 32 GB, ICI 3,584 Gbps.
#   cpu: not a datasheet: the 2-core CI host as `measure_peaks` measured it (WORKSPACE.md:
#     ~170 GFLOP/s f32 matmul, ~26 GB/s); devices there share host memory, so links and
#     the host link run at memory speed, and share its cores (`shared_host`); launch ~50 us
#     (JAX's CPU dispatch). `device_peaks` measures a CPU instead (no `device_kinds`).
DEVICES: dict[str, DeviceSpec] = {d.name: d for d in (
    _nvidia("h100_sxm", 989, 1979, 3350, 80, 900, 128, ("NVIDIA H100 80GB HBM3",)),
    _nvidia("h100_pcie", 756, 1513, 2000, 80, 600, 128, ("NVIDIA H100 PCIe",)),
    _nvidia("h200", 989, 1979, 4800, 141, 900, 128, ("NVIDIA H200",)),
    _nvidia("b200", 2250, 4500, 8000, 180, 1800, 128, ("NVIDIA B200",)),
    _nvidia("a100_sxm_80gb", 312, None, 2039, 80, 600, 64, ("NVIDIA A100-SXM4-80GB",)),
    _nvidia("a100_sxm_40gb", 312, None, 1555, 40, 600, 64, ("NVIDIA A100-SXM4-40GB",)),
    _nvidia("a100_pcie_40gb", 312, None, 1555, 40, 600, 64, ("NVIDIA A100-PCIE-40GB",)),
    _nvidia("a100_pcie_80gb", 312, None, 1935, 80, 600, 64, ("NVIDIA A100 80GB PCIe",)),
    _tpu("tpu_v5e", 197, 819, 16, 1600, ("TPU v5 lite", "TPU v5e")),
    _tpu("tpu_v5p", 459, 2765, 95, 4800, ("TPU v5", "TPU v5p")),
    _tpu("tpu_v6e", 918, 1640, 32, 3584, ("TPU v6 lite", "TPU v6e")),
    DeviceSpec("cpu", 170e9, None, 26e9, 16 * GIB, 26e9, 1e-6, 26e9, 50e-6,
               shared_host=True),
)}

# device_kind -> (dense bf16 TFLOP/s, HBM GB/s): the datasheet peaks of `DEVICES`.
PEAKS: dict[str, tuple[float, float]] = {
    kind: (d.bf16_flops_per_s / 1e12, d.hbm_bytes_per_s / 1e9)
    for d in DEVICES.values() for kind in d.device_kinds}


def device_spec(name: str) -> DeviceSpec:
  """The `DEVICES` entry `name`; ValueError naming the known kinds otherwise."""
  if name not in DEVICES:
    raise ValueError(f"unknown device kind {name!r}; known: {', '.join(DEVICES)}")
  return DEVICES[name]


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


def best_and_median(fn, arg, iters: int) -> tuple[float, float]:
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
  mm_best, mm_median = best_and_median(jax.jit(lambda a: a @ a), a, iters)
  del a
  n = stream_mib * 2 ** 20 // 4
  x = jax.device_put(jnp.ones((n,), jnp.float32), device)
  rd_best, rd_median = best_and_median(jax.jit(jnp.sum), x, iters)
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
  D = cfg.d_model
  shared = attention_matrices(cfg)
  if not cfg.moe_layers[layer]:
    return shared + 3 * D * cfg.d_ff_dense, 0
  shared += D * cfg.num_experts
  if cfg.d_ff_shared:
    shared += 3 * D * cfg.d_ff_shared + (D if cfg.shared_gate else 0)
  return shared, 3 * D * cfg.d_ff_expert


def attention_flops_per_key(cfg: ModelConfig) -> int:
  """FLOPs of one token attending to one key in one layer: QK^T and PV over N heads of H,
  4 N H; latent attention's absorbed form, a score over the row (kv_lora_rank + qk_rope) and
  a value of kv_lora_rank per head, 2 N (2 kv_lora_rank + qk_rope)."""
  if cfg.mla:
    return 2 * cfg.num_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  return 4 * cfg.num_heads * cfg.head_dim


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
  """Distinct experts T tokens reach when each picks top_k of E uniformly: E (1 - (1-k/E)^T)."""
  return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """What a step's cost depends on, summed over its sequences.

  Attributes:
    seqs: sequences.
    tokens: tokens fed (new) over all sequences.
    keys_seen: keys the new tokens attend to in all (a new token at position p sees p + 1).
    context: the sequences' contexts after the step, summed (the keys read once per layer).
  """

  seqs: int
  tokens: int
  keys_seen: int
  context: int

  @classmethod
  def of(cls, new_tokens: Sequence[int], contexts: Sequence[int]) -> BatchShape:
    """Sequences feeding `new_tokens[i]` tokens up to context `contexts[i]` (new included)."""
    # sum over positions c - n .. c - 1 of (p + 1) = n (2c - n + 1) / 2
    seen = sum(n * (2 * c - n + 1) // 2 for n, c in zip(new_tokens, contexts, strict=True))
    return cls(len(new_tokens), sum(new_tokens), seen, sum(contexts))

  @classmethod
  def alike(cls, seqs: int, new_tokens: int, context: int) -> BatchShape:
    """`seqs` sequences that each feed `new_tokens` up to `context`."""
    return cls.of([new_tokens] * seqs, [context] * seqs)


def attention_side_cost(cfg: ModelConfig, layer: int, shape: BatchShape, *, weight_bytes: int,
                        kv_bytes: int) -> Cost:
  """A layer's work besides its routed experts: the matrices every token goes through
  (attention projections; router and shared expert, or the dense MLP), attention over the
  keys seen, every key's K/V (or latent row) read and the new tokens' written."""
  shared, _ = _layer_matrices(cfg, layer)
  flops = 2.0 * shape.tokens * shared + attention_flops_per_key(cfg) * shape.keys_seen
  kv = cfg.kv_stores * cfg.num_kv_heads * cfg.head_dim * (shape.context + shape.tokens)
  return Cost(flops, shared * weight_bytes + kv * kv_bytes)


def routed_experts_cost(cfg: ModelConfig, layer: int, tokens: int, *,
                        weight_bytes: int) -> Cost:
  """A layer's routed experts for `tokens` tokens: top_k experts each, the weights of the
  distinct experts touched read once (`expected_experts_touched`); nothing for a dense layer."""
  _, expert = _layer_matrices(cfg, layer)
  touched = expected_experts_touched(cfg.num_experts, cfg.top_k, tokens)
  return Cost(2.0 * tokens * cfg.top_k * expert, touched * expert * weight_bytes)


def head_cost(cfg: ModelConfig, shape: BatchShape, *, weight_bytes: int) -> Cost:
  """The LM head once per sequence (only the last token's logits are needed), and the
  embedding rows of the step's tokens."""
  D, V = cfg.d_model, cfg.vocab_size
  return Cost(2.0 * shape.seqs * D * V, (D * V + shape.tokens * D) * weight_bytes)


def batch_cost(cfg: ModelConfig, shape: BatchShape, *, weight_bytes: int,
               kv_bytes: int) -> Cost:
  """FLOPs and bytes of one model step over a batch of that shape: every layer's attention
  side and routed experts, and the head."""
  cost = head_cost(cfg, shape, weight_bytes=weight_bytes)
  for layer in range(cfg.num_layers):
    cost += attention_side_cost(cfg, layer, shape, weight_bytes=weight_bytes, kv_bytes=kv_bytes)
    cost += routed_experts_cost(cfg, layer, shape.tokens, weight_bytes=weight_bytes)
  return cost


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
  return batch_cost(cfg, BatchShape.alike(seqs, new_tokens, context),
                    weight_bytes=weight_bytes, kv_bytes=kv_bytes)


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
