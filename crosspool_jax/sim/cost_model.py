"""The simulator's cost model: the modelled seconds of a step's stages and of a whole step.

Work comes from `crosspool_jax.roofline` (FLOPs and bytes of a layer's attention side, of its
routed experts, of the head, from a `ModelConfig` and a `BatchShape`), device figures from its
`DEVICES` table. A stage runs at its roofline:

  stage_s = max(FLOPs / (peak FLOP/s * eff), bytes / (HBM bytes/s * eff))

with one efficiency factor per kind of stage (`Efficiency`, 1.0 = at the roofline, the
default, to be calibrated against measured steps). A program (what the host launches once)
costs its stages plus the device's `dispatch_s`. A device-to-device transfer costs
`link_latency_s + bytes / (link bytes/s * eff)`, an expert swap-in `bytes / (host bytes/s *
eff)` plus the launch of its slot update.

Steps (each also costs the host's `host_s`: 0 unless calibrated):
- colocated (static, shared): each model batch is one program on its group's device (every
  layer's attention side and routed experts, then the head); the programs of one device run
  one after the other, devices in parallel: step = max over devices of their programs' sum.
  A multi-step decode dispatch is one program of its decode steps.
- CrossPool: `pipelined_step_s`, the programs of every micro-batch on in-order device queues
  (below).
- devices that share one host's cores (`DeviceSpec.shared_host`: the CPU's emulated devices):
  nothing overlaps, a step is the sum of its launches, transfers and stages (`serial_s` of the
  step's `Work`).

Calibration (`crosspool_jax.sim.calibrate`) fits `host_step_s`, the launch and transfer
latencies and the efficiencies to measured step times, on such serial steps.

Not modelled: padding to token buckets (the valid tokens are charged), where the attention
work of a sequence whose pages spread over several KV devices runs (its programs and transfers
are charged, its work at its home device), contention of transfers for a link, overlap of a
program with the next one on the same device, activations and norms (a few rows next to the
matrices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from crosspool_jax import roofline
from crosspool_jax.engine.policies.sizes import dtype_itemsize
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.roofline import BatchShape, Cost, DeviceSpec


@dataclasses.dataclass(frozen=True)
class Efficiency:
  """Achieved fraction of the roofline, per kind of stage (each in (0, 1])."""

  attention: float = 1.0
  experts: float = 1.0
  head: float = 1.0
  transfer: float = 1.0
  swap: float = 1.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not (isinstance(value, int | float) and 0 < value <= 1):
        raise ValueError(f"efficiency.{field.name} must be in (0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExpertCall:
  """One expert-dispatch program of a CrossPool layer.

  Attributes:
    device: the weights device it runs on.
    members: indices of the micro-batches it serves.
    seconds: its time on the device (the launch included).
    swap_s: swap-ins it waits for, on its device's host link (0: every expert resident).
  """

  device: int
  members: tuple[int, ...]
  seconds: float
  swap_s: float = 0.0


def pipelined_step_s(homes: Sequence[int], attention_s: Sequence[Sequence[float]],
                     calls: Sequence[Sequence[ExpertCall]], transfer_s: Sequence[float],
                     head_s: Sequence[float], prefetch_s: Mapping[int, float] | None = None
                     ) -> float:
  """Modelled seconds of a CrossPool step: every program on an in-order device queue.

  The executor issues, per layer, the attention side of every micro-batch (in order), then the
  layer's expert calls; each device runs what it was given in issue order. So a program
  starts when its device is free and its inputs are there: micro-batch i's attention side of
  layer l on its home KV device when its layer l-1 output is back; an expert call on its
  weights device when its members' hidden states have arrived (their attention end plus
  `transfer_s[i]`) and its swap-ins are done (issued on the device's host link once the
  members' routing is known, at their attention end); a member's output is back
  `transfer_s[i]` after the call ends. After the last layer each micro-batch's head runs at
  home. The step ends with the last head. Swap-ins issued before the step (`prefetch_s`, the
  executor's prediction) are enqueued on their weights device before any of its programs: its
  host link and its queue are busy with them from the step's start, so they delay that
  device's first expert call (not the attention, which runs on the KV devices meanwhile).

  One KV device, one weights device, m micro-batches each with its own call, no transfers:
  this is the two-stage flow shop of the layer. With a_i, e_i micro-batch i's attention and
  expert times, attention ends at A_i = a_1 + ... + a_i and experts at
  E_i = max(E_{i-1}, A_i) + e_i, the layer takes E_m:
    m = 1: a + e (no overlap);
    equal stages a, e: a + e + (m - 1) max(a, e) (the slower stage paces the pipeline);
    one dominant stage (e_i >= a_{i+1}): a_1 + e_1 + ... + e_m.
  Across layers nothing drains: micro-batch 1's next attention may overlap micro-batch 2's
  experts when their devices differ.

  Args:
    homes: each micro-batch's home KV device.
    attention_s: per micro-batch, per layer it runs, its attention-side program's seconds.
    calls: per layer, its expert calls in issue order (a dense layer has none).
    transfer_s: per micro-batch, one hidden-state transfer between its devices.
    head_s: per micro-batch, its head (and sampling) program's seconds.
    prefetch_s: per weights device, the seconds of its swap-ins issued before the step (none
      if absent).
  """
  free: dict[tuple[str, int], float] = {}
  for device, seconds in (prefetch_s or {}).items():
    if seconds:
      free["host", device] = free["weights", device] = seconds
  ready = [0.0] * len(homes)
  depth = max((len(a) for a in attention_s), default=0)
  for layer in range(depth):
    for i, home in enumerate(homes):
      if layer < len(attention_s[i]):
        start = max(free.get(("kv", home), 0.0), ready[i])
        ready[i] = free["kv", home] = start + attention_s[i][layer]
    for call in calls[layer] if layer < len(calls) else ():
      routed = max(ready[i] for i in call.members)
      arrived = max(ready[i] + transfer_s[i] for i in call.members)
      swapped = max(free.get(("host", call.device), 0.0), routed) + call.swap_s
      if call.swap_s:
        free["host", call.device] = swapped
      start = max(free.get(("weights", call.device), 0.0), arrived, swapped)
      free["weights", call.device] = end = start + call.seconds
      for i in call.members:
        ready[i] = end + transfer_s[i]
  end = 0.0
  for i, home in enumerate(homes):
    start = max(free.get(("kv", home), 0.0), ready[i])
    free["kv", home] = done = start + head_s[i]
    end = max(end, done)
  return end


STAGES = ("attention", "experts", "head", "transfer", "swap")


@dataclasses.dataclass
class Work:
  """What a step asked of the devices: programs launched (`swaps` of them expert swap-ins'
  slot writes), device-to-device transfers, model programs run at a (model, token bucket)
  shape for the first time, and each kind of stage's seconds at the roofline (efficiency 1;
  `STAGES`)."""

  programs: int = 0
  transfers: int = 0
  first_runs: int = 0
  swaps: int = 0
  attention: float = 0.0
  experts: float = 0.0
  head: float = 0.0
  transfer: float = 0.0
  swap: float = 0.0

  def rerun(self, reads: int) -> None:
    """The step runs again after its first run, with `reads` blocking reads (counted as
    transfers): every launch, transfer and stage twice, the swap-ins (their programs too) and
    first runs once."""
    for name in ("transfers", *(k for k in STAGES if k != "swap")):
      setattr(self, name, 2 * getattr(self, name))
    self.programs = 2 * self.programs - self.swaps
    self.transfers += reads


class CostModel:
  """Modelled seconds of stages and programs on one device kind (the module docstring).

  Every stage, launch and transfer it charges is also added to `work` (the current step's
  `Work`, restarted by `begin_step`): on devices that share the host (`DeviceSpec.shared_host`)
  a step costs `serial_s` of it, and calibration fits the host and efficiency terms to it.

  Args:
    device: a `roofline.DEVICES` name or a `DeviceSpec`.
    weight_dtype: the params' dtype (bytes per weight; fp8 types use the fp8 peak).
    kv_dtype: the KV pages' dtype.
    efficiency: the achieved fractions of the roofline.
    host_step_s: the host's own seconds per engine step (scheduling, reading the sampled
      tokens back), charged once per step before its programs.
    first_run_s: the extra seconds of a model's program the first time it runs at a shape
      (a runtime's first execution: buffers allocated, threads started), per `Work.first_runs`.
  """

  def __init__(self, device: str | DeviceSpec, *, weight_dtype: str = "bfloat16",
               kv_dtype: str = "bfloat16", efficiency: Efficiency = Efficiency(),
               host_step_s: float = 0.0, first_run_s: float = 0.0):
    for name, value in (("host_step_s", host_step_s), ("first_run_s", first_run_s)):
      if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    self.spec = device if isinstance(device, DeviceSpec) else roofline.device_spec(device)
    self.weight_bytes = dtype_itemsize(weight_dtype)
    self.kv_bytes = dtype_itemsize(kv_dtype)
    # activations travel in bf16 unless the weights are wider (f32 models on CPU)
    self.activation_bytes = max(2, self.weight_bytes)
    self.flops_per_s = self.spec.flops_per_s(weight_dtype)
    self.efficiency = efficiency
    self.host_step_s = host_step_s
    self.first_run_s = first_run_s
    self.work = Work()

  def begin_step(self) -> None:
    """Starts a new step's `work`."""
    self.work = Work()

  def host_s(self, work: Work) -> float:
    """The host's step and its programs' first runs."""
    return self.host_step_s + work.first_runs * self.first_run_s

  def serial_s(self, work: Work) -> float:
    """A step whose programs run one after the other (devices sharing the host): `host_s`,
    every launch and transfer latency, and each stage at its efficiency."""
    return (self.host_s(work) + work.programs * self.spec.dispatch_s
            + work.transfers * self.spec.link_latency_s
            + sum(getattr(work, kind) / getattr(self.efficiency, kind) for kind in STAGES))

  def launch_s(self, programs: int = 1) -> float:
    """The host's launch of `programs` programs."""
    self.work.programs += programs
    return programs * self.spec.dispatch_s

  def _stage_s(self, cost: Cost, kind: str) -> float:
    """max(FLOPs / (peak * eff), bytes / (bandwidth * eff)) of a `kind` stage."""
    at_roofline = max(cost.flops / self.flops_per_s, cost.bytes / self.spec.hbm_bytes_per_s)
    setattr(self.work, kind, getattr(self.work, kind) + at_roofline)
    return at_roofline / getattr(self.efficiency, kind)

  def attention_side_s(self, cfg: ModelConfig, layer: int, shape: BatchShape) -> float:
    cost = roofline.attention_side_cost(cfg, layer, shape, weight_bytes=self.weight_bytes,
                                        kv_bytes=self.kv_bytes)
    return self._stage_s(cost, "attention")

  def experts_s(self, cfg: ModelConfig, layer: int, tokens: int) -> float:
    cost = roofline.routed_experts_cost(cfg, layer, tokens, weight_bytes=self.weight_bytes)
    return self._stage_s(cost, "experts")

  def expert_call_s(self, members: Sequence[tuple[ModelConfig, int, int]]) -> float:
    """One expert-dispatch program over its members' (cfg, layer, tokens): their routed
    experts' work together, and its launch."""
    cost = sum((roofline.routed_experts_cost(cfg, layer, tokens, weight_bytes=self.weight_bytes)
                for cfg, layer, tokens in members), Cost(0.0, 0.0))
    return self.launch_s() + self._stage_s(cost, "experts")

  def head_s(self, cfg: ModelConfig, shape: BatchShape) -> float:
    cost = roofline.head_cost(cfg, shape, weight_bytes=self.weight_bytes)
    return self._stage_s(cost, "head")

  def transfer_s(self, cfg: ModelConfig, tokens: int, count: int = 1) -> float:
    """One device-to-device transfer of `tokens` hidden states; `count` of them are charged
    to `work` (a pipeline uses one transfer's seconds for each of its uses)."""
    at_roofline = tokens * cfg.d_model * self.activation_bytes / self.spec.link_bytes_per_s
    self.work.transfers += count
    self.work.transfer += count * at_roofline
    return self.spec.link_latency_s + at_roofline / self.efficiency.transfer

  def swap_in_s(self, nbytes: int) -> float:
    """Host-to-device copy of `nbytes` of experts and the program writing them (0 if none)."""
    if not nbytes:
      return 0.0
    self.work.swap += nbytes / self.spec.host_bytes_per_s
    self.work.swaps += 1
    return nbytes / (self.spec.host_bytes_per_s * self.efficiency.swap) + self.launch_s()

  def model_stages_s(self, cfg: ModelConfig, shape: BatchShape) -> float:
    """Every layer's attention side and routed experts, then the head (no launch)."""
    layers = sum(self.attention_side_s(cfg, layer, shape)
                 + self.experts_s(cfg, layer, shape.tokens) for layer in range(cfg.num_layers))
    return layers + self.head_s(cfg, shape)

  def model_step_s(self, cfg: ModelConfig, shape: BatchShape) -> float:
    """A colocated model step: one program of `model_stages_s`."""
    return self.launch_s() + self.model_stages_s(cfg, shape)

  def decode_loop_s(self, cfg: ModelConfig, contexts: Sequence[int],
                    steps: Sequence[int]) -> float:
    """A multi-step decode dispatch: sequence i (context `contexts[i]` after its first step)
    runs `steps[i]` decode steps; one program of the decode steps of those still running."""
    total = self.launch_s()
    for j in range(max(steps)):
      live = [c + j for c, k in zip(contexts, steps, strict=True) if k > j]
      total += self.model_stages_s(cfg, BatchShape.of([1] * len(live), live))
    return total


def colocated_step_s(programs: Sequence[tuple[int, float]]) -> float:
  """(device, seconds) of each model program: devices in parallel, programs of a device in
  sequence."""
  per_device: dict[int, float] = {}
  for device, seconds in programs:
    per_device[device] = per_device.get(device, 0.0) + seconds
  return max(per_device.values(), default=0.0)
