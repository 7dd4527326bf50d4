"""`SimExecutor`: the executor protocol with no model and no device, charging modelled time.

Tokens follow `fake_tokens` (the token after position p is p % 97, as `FakeExecutor`'s), so a
simulated engine schedules exactly as a real one whose outputs hit no stop id. Each
`run_many` models its step's seconds (`cost_model`: the host's step, then its programs
overlapped across devices, or all in sequence on devices that share the host), records them
and what the step asked of the devices (`Work`, what calibration fits to), and advances the
simulated clock by them, so the engine stamps the step's tokens at its modelled end.

Colocated policies (no weights pool): each model batch is one program on its group's device,
`colocated_step_s` of them. CrossPool policies: the batches are cut into micro-batches and
given ping-pong phases as the executor does (`ping_pong`, issued phase by phase). Before the
step, the experts it may route to are made resident by the executor's own prediction
(`predict_resident`, `prefetch_predicted`, on the real `WeightsPool`): per (shape class, home
weights device) partition, every expert of the step's MoE layers homed there if they fit its
slots together, else each layer's choice in its model's last step (here: the experts the
router drew for the layer in that step, all its micro-batches together, as the executor reads
them); those loads are charged as swap-ins issued before the step on their weights device,
delaying its first expert call (`pipelined_step_s`'s `prefetch_s`: the executor enqueues them
there before the step's first program). Per MoE layer the micro-batches of one (phase, shape
class, home weights device) group share expert calls as the executor plans them
(`plan_expert_calls`, with the routing known); the experts each micro-batch routes to are
drawn (`Router`) and accessed through the real `WeightsPool.access` (the earlier members of
the call protected, as `DeviceWeightsPool.access_many` does), so hits, misses and evictions
come from the pool and its expert policy. A step in which an access misses (a routed expert
the prediction did not make resident) costs what the executor's miss path does: its
speculative run (after the prefetch; nothing loads on demand, the missing experts read filler
slots), discarded, then what it chose is loaded (its misses' swap-ins, issued on their weights
devices before the rerun) and the step retried speculatively, which hits (the routing drawn
here does not depend on hidden states). If a partition cannot hold the step's choices
together, the rerun is the sync one instead: it reads each expert call's routing first, and
its on-demand loads are charged as swap-ins before their call. A micro-batch whose pages
spread over several KV devices runs its attention as the executor does (a program per device
holding pages, q/k/v out and the results back, a merge at home).
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from crosspool_jax.engine.executors.api import (
  FAKE_VOCAB,
  HostCounters,
  LoadedModel,
  blame,
  fake_tokens,
)
from crosspool_jax.engine.executors.crosspool import (
  chosen_by_partition,
  expert_group,
  holds_together,
  ping_pong,
  plan_expert_calls,
  predict_resident,
  prefetch_predicted,
)
from crosspool_jax.engine.policies.crosspool import fused_token_buckets
from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.pools.kv_pool import KVPool
from crosspool_jax.pools.weights_pool import WeightsPool
from crosspool_jax.roofline import BatchShape
from crosspool_jax.sim.cost_model import (
  CostModel,
  ExpertCall,
  Work,
  colocated_step_s,
  pipelined_step_s,
)
from crosspool_jax.sim.routing import Router


class SimClock:
  """Simulated seconds: calling it reads them; the executor advances them step by step."""

  def __init__(self, now: float = 0.0):
    self.now = now

  def __call__(self) -> float:
    return self.now

  def advance(self, seconds: float) -> None:
    if not seconds >= 0:
      raise ValueError(f"the simulated clock cannot go back: advance({seconds!r})")
    self.now += seconds


def _shape(batch: ModelBatch) -> BatchShape:
  """New tokens and contexts after the step of a batch's sequences (before its commit)."""
  return BatchShape.of(batch.num_new, [r.num_cached + n for r, n in
                                       zip(batch.requests, batch.num_new, strict=True)])


class SimExecutor:
  """Runs nothing; tokens by `fake_tokens`, each step's modelled seconds on `clock`.

  Args:
    models: the engine's registered models (cfg and KV group; no params needed).
    config: the engine config (devices, micro-batching, fusion, token budget).
    cost: the cost model of the devices.
    clock: the simulated clock, advanced by each step's seconds.
    weights_pool: the host weights pool of a CrossPool policy (None: colocated).
    router: the routing model (CrossPool policies).
    kv_pools: model id -> its KV pool (CrossPool: where each micro-batch's pages are).
  """

  def __init__(self, models: dict[str, LoadedModel], config, cost: CostModel, clock: SimClock,
               *, weights_pool: WeightsPool | None = None, router: Router | None = None,
               kv_pools: dict[str, KVPool] | None = None):
    if weights_pool is not None and router is None:
      raise ValueError("a CrossPool simulation needs a router (the routing model)")
    if weights_pool is not None and config.decode_steps_per_dispatch != 1:
      raise ValueError(f"decode_steps_per_dispatch={config.decode_steps_per_dispatch}: the "
                       "simulator models the crosspool executor's multi-step chunks not yet; "
                       "simulate crosspool policies with 1")
    self.models = models
    self.config = config
    self.cost = cost
    self.clock = clock
    self.weights_pool = weights_pool
    self.router = router
    self.kv_pools = kv_pools or {}
    self.counters = HostCounters()
    self.step_s: list[float] = []  # the modelled seconds of every step run
    self.step_work: list[Work] = []  # what each step asked of the devices
    self.shapes_run: set[tuple] = set()  # (model, token bucket or "decode") run so far
    self.calls = self.members = self.splits = self.miss_steps = self.retry_runs = 0
    # (model, layer) -> the experts its last step routed to: what the prediction repeats
    self._last_chosen: dict[tuple[str, int], np.ndarray] = {}

  @property
  def compile_count(self) -> int:
    return 0

  def compile_all(self, log=None) -> int:
    return 0

  def restore_lost_buffers(self) -> list:
    return []

  def remove_model(self, model_id: str) -> None:
    """Forgets a model's last routing (the engine drops it from `models`, the pools return its
    pages and slots)."""
    self._last_chosen = {k: v for k, v in self._last_chosen.items() if k[0] != model_id}

  def expert_call_stats(self) -> dict:
    """Expert calls of the steps, the micro-batches they served, fused groups cut into several
    calls, and the steps whose routing chose an expert not resident after the prediction's
    prefetch (the miss path), and of those the steps retried with their choices loaded (the
    others rerun in the sync mode)."""
    return {"fused": self.config.fuse_experts, "calls": self.calls,
            "micro_batches": self.members, "splits": self.splits,
            "mean_members_per_call": self.members / self.calls if self.calls else 0.0,
            "miss_steps": self.miss_steps, "retry_runs": self.retry_runs}

  def run_many(self, batches: list[ModelBatch]) -> list:
    """The batches' tokens; charges the step's modelled seconds to the clock."""
    self.cost.begin_step()
    for b in batches:
      key = (b.model_id, "decode" if b.decode_steps else self.config.token_buckets[
          min(bisect.bisect_left(self.config.token_buckets, b.num_tokens),
              len(self.config.token_buckets) - 1)])
      self.cost.work.first_runs += key not in self.shapes_run
      self.shapes_run.add(key)
    overlapped = (self._colocated_s(batches) if self.weights_pool is None
                  else self._crosspool_s(batches))
    work = self.cost.work
    seconds = (self.cost.serial_s(work) if self.cost.spec.shared_host
               else self.cost.host_s(work) + overlapped)
    self.step_s.append(seconds)
    self.step_work.append(work)
    self.counters.dispatches += work.programs
    self.clock.advance(seconds)
    self.counters.steps += max((max(b.decode_steps) for b in batches if b.decode_steps),
                               default=1)
    self.counters.tokens += sum(sum(b.decode_steps) if b.decode_steps else b.num_sampled
                                for b in batches)
    return fake_tokens(batches, FAKE_VOCAB)

  def _colocated_s(self, batches: list[ModelBatch]) -> float:
    programs = []
    for b in batches:
      model = self.models[b.model_id]
      if b.decode_steps is None:
        seconds = self.cost.model_step_s(model.cfg, _shape(b))
      else:
        seconds = self.cost.decode_loop_s(model.cfg, [r.num_cached + 1 for r in b.requests],
                                          b.decode_steps)
      programs.append((self.config.devices[model.group], seconds))
    return colocated_step_s(programs)

  def _crosspool_s(self, batches: list[ModelBatch]) -> float:
    c, cost = self.config, self.cost
    phased = ping_pong(batches, c.micro_batches, c.micro_batch_min_tokens)
    mbs = [part for _, _, part in phased]
    phases = [phase for phase, _, _ in phased]
    cfgs = [self.models[mb.model_id].cfg for mb in mbs]
    shapes = [_shape(mb) for mb in mbs]
    pairs = list(zip(cfgs, shapes, strict=True))
    attention = [[self._attention_s(k, cfg, layer, shape) for layer in range(cfg.num_layers)]
                 for k, (cfg, shape) in zip(map(self._kv_devices, mbs), pairs, strict=True)]
    prefetch_s = self._prefetch_s(mbs, cfgs)
    misses = self.weights_pool.stats.misses
    chosen: dict[tuple[str, int], list] = {}
    calls = [self._expert_calls(mbs, phases, cfgs, layer, chosen)
             for layer in range(max(cfg.num_layers for cfg in cfgs))]
    step_chosen = {k: np.unique(np.concatenate(v)) for k, v in chosen.items()}
    self._last_chosen.update(step_chosen)
    missed = self.weights_pool.stats.misses > misses
    self.miss_steps += missed
    served = [0] * len(mbs)  # expert calls per micro-batch: two transfers each
    for call in (call for layer_calls in calls for call in layer_calls):
      for i in call.members:
        served[i] += 1
    homes = [self.models[mb.model_id].group for mb in mbs]
    transfer_s = [cost.transfer_s(cfg, shape.tokens, count=2 * n)
                  for (cfg, shape), n in zip(pairs, served, strict=True)]
    # the input program (unpack, embed) and the head's
    head_s = [cost.launch_s(2) + cost.head_s(cfg, shape) for cfg, shape in pairs]
    if not missed:
      return pipelined_step_s(homes, attention, calls, transfer_s, head_s, prefetch_s)
    # the executor's miss path: the speculative run (after the prefetch, loading nothing on
    # demand) is discarded; what it chose is loaded and the step retried speculatively (the
    # routing drawn here does not depend on hidden states, so a retry never misses again), or,
    # if a partition cannot hold its choices together, run again reading each expert call's
    # routing back before it (a blocking read: a transfer's latency), loading what it lacks
    # first
    speculative = [[dataclasses.replace(call, swap_s=0.0) for call in layer_calls]
                   for layer_calls in calls]
    first = pipelined_step_s(homes, attention, speculative, transfer_s, head_s, prefetch_s)
    if holds_together(self.weights_pool, chosen_by_partition(self.weights_pool, step_chosen)):
      self.retry_runs += 1
      cost.work.rerun(0)
      loads: dict[int, float] = {}  # the misses' swap-ins, issued before the retry
      for call in (call for layer_calls in calls for call in layer_calls):
        loads[call.device] = loads.get(call.device, 0.0) + call.swap_s
      return first + pipelined_step_s(homes, attention, speculative, transfer_s, head_s, loads)
    reads = sum(map(len, calls))
    cost.work.rerun(reads)
    return (first + pipelined_step_s(homes, attention, calls, transfer_s, head_s)
            + reads * cost.spec.link_latency_s)

  def _prefetch_s(self, mbs: list[ModelBatch], cfgs: list) -> dict[int, float]:
    """Makes resident what the executor predicts for the step's MoE layers (`predict_resident`
    from each layer's last routing); returns, per weights device, the seconds of the swap-ins
    that took: one per layer with loads, as the executor issues them."""
    pool = self.weights_pool
    layers = dict.fromkeys((mb.model_id, layer) for mb, cfg in zip(mbs, cfgs, strict=True)
                           for layer, moe in enumerate(cfg.moe_layers) if moe)
    seconds: dict[int, float] = {}
    for (m, layer), plan in prefetch_predicted(
        pool.prefetch, predict_resident(pool, layers, self._last_chosen)):
      if plan.loads:
        device = pool.home_device(m, layer)
        seconds[device] = seconds.get(device, 0.0) + self.cost.swap_in_s(
            len(plan.loads) * pool.models[m].shape_class.expert_bytes)
    return seconds

  def _kv_devices(self, mb: ModelBatch) -> int:
    """How many KV devices a micro-batch's attention runs on: its home and those holding its
    pages."""
    pool = self.kv_pools.get(mb.model_id)
    if pool is None:
      return 1
    return len(pool.devices_holding(mb.model_id, [r.request_id for r in mb.requests])
               | {self.models[mb.model_id].group})

  def _attention_s(self, k: int, cfg, layer: int, shape: BatchShape) -> float:
    """A micro-batch's attention side of a layer on `k` KV devices, as the executor runs it:
    one program when k is 1; else its q/k/v out to each other device and the results back, a
    write-and-attend program on each, the inputs' and the merge's programs at home (the work
    charged at home)."""
    seconds = self.cost.launch_s(1 if k == 1 else k + 2)
    if k > 1:
      seconds += self.cost.transfer_s(cfg, shape.tokens, count=2 * (k - 1)) * 2 * (k - 1)
    return seconds + self.cost.attention_side_s(cfg, layer, shape)

  def _expert_calls(self, mbs: list[ModelBatch], phases: list[int], cfgs: list, layer: int,
                    chosen_by_layer: dict[tuple[str, int], list]) -> list[ExpertCall]:
    """A layer's expert calls: routing drawn (each micro-batch's added to `chosen_by_layer`
    under its (model, layer)), experts made resident, calls planned."""
    pool = self.weights_pool
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (mb, cfg) in enumerate(zip(mbs, cfgs, strict=True)):
      if layer < cfg.num_layers and cfg.moe_layers[layer]:
        groups.setdefault(expert_group(pool, mb.model_id, layer, phases[i]), []).append(i)
    # the largest fused bucket, as the crosspool policy gives the executor
    max_tokens = fused_token_buckets(self.config)[-1]
    out = []
    for (_, c, device), members in groups.items():
      chosen = {i: self.router.experts(mbs[i].model_id, cfgs[i], layer, mbs[i].num_tokens)
                for i in members}
      for i in members:
        chosen_by_layer.setdefault((mbs[i].model_id, layer), []).append(chosen[i])
      keys = [{(mbs[i].model_id, layer, int(e)) for e in chosen[i]} for i in members]
      planned = plan_expert_calls(members, [mbs[i].num_tokens for i in members], keys,
                                  fuse=self.config.fuse_experts, max_tokens=max_tokens,
                                  can_hold=pool.can_hold)
      self.splits += len(planned) > 1 and self.config.fuse_experts
      for call in planned:
        loads, protect = 0, set()
        with blame([mbs[i].model_id for i in call]):
          for i in call:
            plan = pool.access(mbs[i].model_id, layer, chosen[i].tolist(), protect=protect)
            loads += len(plan.loads)
            protect |= {(mbs[i].model_id, layer, int(e)) for e in chosen[i]}
        seconds = self.cost.expert_call_s([(cfgs[i], layer, mbs[i].num_tokens) for i in call])
        out.append(ExpertCall(device, tuple(call), seconds,
                              self.cost.swap_in_s(loads * pool.classes[c].shape.expert_bytes)))
        self.calls += 1
        self.members += len(call)
    return out
