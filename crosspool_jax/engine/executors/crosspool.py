"""The CrossPool executor: attention on the KV-pool devices, routed experts on the weights pool.

Each model's params without its routed experts live on its home KV device, the one KV pool spans
every KV device, the routed experts live in the weights pool. A step dispatches the stages of
`models/stages.py` per layer and micro-batch in ping-pong order, expert calls fused across
micro-batches of one shape class and home weights device (`fuse_experts`); `Timeline` records
each stage's in-flight interval. Invariant: a stage runs where its data lives (attention on the
devices of its pages, experts on the weights device holding their slots, made resident before
the call) and no shape is compiled after `compile_all`. How: WORKSPACE.md, "The CrossPool
executor". Shape suffixes: WORKSPACE.md.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.executors.api import HostCounters, LoadedModel, blame
from crosspool_jax.engine.executors.batching import pack_batch, token_bucket
from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models import stages
from crosspool_jax.pools.kv_buffers import allocate_kv_buffer
from crosspool_jax.pools.kv_pool import KVPool
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
  """Which devices (indices into `jax.devices()`) form the KV pool and the weights pool."""

  kv_devices: tuple[int, ...]
  weight_devices: tuple[int, ...]

  def resolve(self) -> tuple[list[jax.Device], list[jax.Device]]:
    """The devices; ValueError for an empty pool, an overlap or an index out of range."""
    if not self.kv_devices:
      raise ValueError("device split: the KV pool has no devices")
    if not self.weight_devices:
      raise ValueError("device split: the weights pool has no devices")
    overlap = set(self.kv_devices) & set(self.weight_devices)
    if overlap:
      raise ValueError(f"device split: devices {sorted(overlap)} are in both pools")
    devices = jax.devices()
    bad = [d for d in (*self.kv_devices, *self.weight_devices) if not 0 <= d < len(devices)]
    if bad:
      raise ValueError(f"device split: indices {bad} out of range ({len(devices)} devices)")
    return [devices[d] for d in self.kv_devices], [devices[d] for d in self.weight_devices]


class Timeline:
  """Start (host issue) and end (output ready) of each stage, per micro-batch and layer."""

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.events: list[dict] = []
    self._queue: queue.Queue = queue.Queue()
    self._threads = []
    if enabled:
      for _ in range(4):  # a few watchers so one slow stage does not delay the others' stamps
        t = threading.Thread(target=self._watch, daemon=True)
        t.start()
        self._threads.append(t)

  def track(self, out, *, step: int, micro_batch: int, model: str, layer: int, kind: str,
            device: str, members: tuple[int, ...] | None = None,
            models: tuple[str, ...] | None = None) -> None:
    """Records a stage issued now whose output is `out`.

    A fused expert call passes its member micro-batches and their models (`members`,
    `models`); `micro_batch` / `model` are then its first member's.
    """
    if not self.enabled:
      return
    event = {"step": step, "micro_batch": micro_batch, "model": model, "layer": layer,
             "kind": kind, "device": device, "start": time.perf_counter(), "end": None,
             "members": list(members or (micro_batch,)), "models": list(models or (model,))}
    self.events.append(event)
    self._queue.put((event, out))

  def _watch(self) -> None:
    while True:
      event, out = self._queue.get()
      try:
        jax.block_until_ready(out)
        event["end"] = time.perf_counter()
      finally:
        self._queue.task_done()

  def wait(self) -> None:
    self._queue.join()

  def overlap(self) -> dict:
    """How much of the busy time had stages of two or more micro-batches in flight.

    Stages of two micro-batches: two in-flight stages serving disjoint sets of micro-batches
    (a fused expert call serves several, and is not overlapped with its own members' stages).

    Returns {"overlap_fraction", "busy_s", "overlap_s", "transfers_concurrent_with_compute"}
    where the last counts transfers of one micro-batch in flight while a compute stage of
    other micro-batches of the same step was in flight.
    """
    self.wait()
    busy = overlapped = 0.0
    concurrent = 0
    for step in sorted({e["step"] for e in self.events}):
      evs = [e for e in self.events if e["step"] == step and e["end"] is not None]
      cuts = sorted({t for e in evs for t in (e["start"], e["end"])})
      for a, b in itertools.pairwise(cuts):
        live = {frozenset(e["members"]) for e in evs if e["start"] < b and e["end"] > a}
        if live:
          busy += b - a
        if any(not x & y for x, y in itertools.combinations(live, 2)):
          overlapped += b - a
      transfers = [e for e in evs if e["kind"].startswith("transfer")]
      computes = [e for e in evs if not e["kind"].startswith("transfer")]
      concurrent += sum(
          any(not set(c["members"]) & set(t["members"]) and c["start"] < t["end"]
              and c["end"] > t["start"] for c in computes) for t in transfers)
    return {"overlap_fraction": overlapped / busy if busy else 0.0, "busy_s": busy,
            "overlap_s": overlapped, "transfers_concurrent_with_compute": concurrent}


@jax.jit
def _stage(x_UD, slots_UK, weights_UK, valid_U, h_TD, ids_TK, weights_TK, valid_T, slot_table_E,
           offset):
  """Packs one member micro-batch into a fused expert call's inputs (returns them updated).

  Its valid tokens go to rows offset, offset + 1, ... of the fused bucket (U rows), its expert
  ids become slot ids of the class buffer through its layer's slot table (every chosen expert
  is resident, so the fused call can use the identity slot table), and a top_k smaller than the
  fused K_f is padded with weight-0 repeats of the first choice (a resident slot: exact no-op).

  Args:
    x_UD, slots_UK, weights_UK (f32), valid_U: the fused inputs so far.
    h_TD, ids_TK, weights_TK, valid_T: the member's (on the weights device).
    slot_table_E: int32 [E] its layer's slot table.
    offset: int32 scalar, the fused row of its first valid token.
  """
  U, K_f = slots_UK.shape
  K = ids_TK.shape[1]
  rank_T = jnp.cumsum(valid_T.astype(jnp.int32)) - 1
  rows_T = jnp.where(valid_T, offset + rank_T, U)  # U: out of range, dropped
  slots_TK = jnp.take(slot_table_E, ids_TK, mode="clip")
  weights_TK = weights_TK.astype(jnp.float32)
  if K < K_f:
    slots_TK = jnp.concatenate([slots_TK, jnp.repeat(slots_TK[:, :1], K_f - K, axis=1)], 1)
    weights_TK = jnp.pad(weights_TK, ((0, 0), (0, K_f - K)))
  drop = dict(mode="drop")
  return (x_UD.at[rows_T].set(h_TD.astype(x_UD.dtype), **drop),
          slots_UK.at[rows_T].set(slots_TK, **drop),
          weights_UK.at[rows_T].set(weights_TK, **drop),
          valid_U.at[rows_T].set(valid_T, **drop))


@jax.jit
def _unstage(y_UD, valid_T, offset):
  """A member's expert output [T, D] cut from the fused one (padding rows zero, as unfused)."""
  rows_T = jnp.where(valid_T, offset + jnp.cumsum(valid_T.astype(jnp.int32)) - 1, 0)
  return jnp.where(valid_T[:, None], y_UD[rows_T], jnp.zeros((), y_UD.dtype))


@dataclasses.dataclass
class _MicroBatch:
  index: int
  model: LoadedModel
  batch: ModelBatch
  paged: list  # PagedBatch per KV device, on that device
  sampling: dict  # on the home KV device
  next_pos: jax.Array  # on the home KV device
  valid_T: jax.Array  # on the home KV device
  valid_host: np.ndarray  # bool [T], the same on the host
  x_TD: jax.Array
  moe: tuple | None = None  # (x_TD after attention, h_TD, ids_TK, weights_TK) between stages

  @property
  def home(self) -> int:
    """Index of the model's home KV device."""
    return self.model.group

  @property
  def num_tokens(self) -> int:
    return int(self.valid_host.sum())


class DisaggregatedExecutor:
  """Runs model batches with the CrossPool memory organisation (see the module docstring).

  Args:
    models: registered models; params WITHOUT routed experts, each on its home KV device
      (`kv_buffers[model.group]`'s device).
    kv_pool: the one KV pool over all KV devices (shared by every model).
    kv_buffers: its page buffer on each KV device (updated in place).
    wpool: the weights pool holding every model's routed experts on the weights devices.
    token_buckets: padded token counts per micro-batch.
    max_batch: sequences per micro-batch.
    micro_batches: parts each model batch is cut into (1 = no pipeline, the ablation).
    attn_impl, moe_impl: kernel implementations.
    timeline: record the per-stage timeline.
    fuse_experts: micro-batches of one shape class and home weights device share one expert
      call per layer (False: one call per micro-batch, the ablation).
    fused_token_buckets: padded token counts of a fused call (default: `token_buckets`); a
      group with more valid tokens than the largest is split over several calls.
  """

  def __init__(self, models: dict[str, LoadedModel], kv_pool: KVPool,
               kv_buffers: list[jax.Array], wpool: DeviceWeightsPool, *,
               token_buckets: tuple[int, ...], max_batch: int, micro_batches: int = 2,
               attn_impl: str | None = None, moe_impl: str | None = None,
               timeline: bool = True, fuse_experts: bool = True,
               fused_token_buckets: tuple[int, ...] | None = None):
    if not 1 <= micro_batches <= max_batch:
      raise ValueError(f"micro_batches must be in [1, max_batch={max_batch}] (a micro-batch "
                       f"needs at least one request), got {micro_batches}")
    if len(kv_buffers) != kv_pool.num_devices:
      raise ValueError(f"{len(kv_buffers)} KV buffers for {kv_pool.num_devices} KV devices")
    bad = {m: model.group for m, model in models.items()
           if not 0 <= model.group < len(kv_buffers)}
    if bad:
      raise ValueError(f"home KV device (group) out of range [0, {len(kv_buffers)}): {bad}")
    self.models = dict(models)
    self.kv_pool = kv_pool
    self.kv_buffers = list(kv_buffers)
    self.kv_devices = [b.devices().pop() for b in kv_buffers]
    self.wpool = wpool
    self.token_buckets = tuple(token_buckets)
    self.max_batch = max_batch
    self.micro_batches = micro_batches
    self.attn_impl = attn_impl
    self.moe_impl = moe_impl
    self.timeline = Timeline(timeline)
    self.fuse_experts = fuse_experts
    self.fused_token_buckets = tuple(sorted(set(fused_token_buckets or token_buckets)))
    if self.fused_token_buckets[-1] < self.token_buckets[-1]:
      raise ValueError(f"fused_token_buckets {self.fused_token_buckets} must reach the largest "
                       f"token bucket {self.token_buckets[-1]}")
    self.steps = 0
    self.counters = HostCounters()
    self.expert_calls = 0  # expert-dispatch calls issued in served steps
    self.expert_members = 0  # micro-batches they served (one each when not fused)
    self.expert_splits = 0  # fused groups cut into several calls (slots or tokens)
    self._warm: set[tuple[str, int]] = set()
    self._warm_fused: set[tuple[int, int, int]] = set()  # (class, weights device, bucket)
    self._fused_zeros: dict[tuple[int, int, int], tuple] = {}
    self._identity: dict[tuple[int, int], jax.Array] = {}

  @property
  def compile_count(self) -> int:
    """Warmed (model, token bucket) pairs plus warmed fused (class, device, bucket) shapes."""
    return len(self._warm) + len(self._warm_fused)

  def expert_call_stats(self) -> dict:
    """Expert-dispatch calls of served steps and the micro-batches they served."""
    return {"fused": self.fuse_experts, "calls": self.expert_calls,
            "micro_batches": self.expert_members, "splits": self.expert_splits,
            "mean_members_per_call": (self.expert_members / self.expert_calls
                                      if self.expert_calls else 0.0)}

  def compile_all(self, log=None) -> int:
    """Warms every (model, token bucket) with an all-padding micro-batch (compiles each stage),
    and with `fuse_experts` every fused bucket of every (class, weights device) with every
    member shape that can join it."""
    if self.fuse_experts:
      self._make_fused_buffers()
    for model_id in self.models:
      self._warm_model(model_id, log)
    if self.fuse_experts:
      self._warm_fused_calls(log)
    return self.compile_count

  def _warm_model(self, model_id: str, log=None) -> None:
    model = self.models[model_id]
    for bucket in self.token_buckets:
      empty = ModelBatch(model_id, [], [])
      self._run_micro_batches([self._prepare(0, model, empty, bucket)], track=False)
      self._warm.add((model_id, bucket))
      if log:
        log(f"compiled {model_id} tokens={bucket}")

  def add_model(self, model: LoadedModel, log=None) -> None:
    """Serves a model registered while running (its experts already in the weights pool, its
    params on its home KV device): warms its buckets, and the fused expert calls it may join
    (shapes already warmed compile nothing)."""
    self.models[model.model_id] = model
    self._warm_model(model.model_id, log)
    if self.fuse_experts:
      self._make_fused_buffers()
      self._warm_fused_calls(log)

  def remove_model(self, model_id: str) -> None:
    """Stops running a model (its experts are removed from the weights pool by the caller)."""
    del self.models[model_id]
    self._warm = {w for w in self._warm if w[0] != model_id}

  def restore_lost_buffers(self) -> list[KVPool]:
    """Re-allocates the KV buffers a failed step consumed (donated, never returned) and
    rebuilds lost weights-pool buffers; returns [the KV pool] if KV pages were lost (its
    requests must be recomputed), else []."""
    self.wpool.restore_lost_buffers()
    lost = []
    for d, buf in enumerate(self.kv_buffers):
      if buf.is_deleted():
        self.kv_buffers[d] = allocate_kv_buffer(self.kv_pool, self.kv_devices[d],
                                                dtype=buf.dtype)
        lost = [self.kv_pool]
    return lost

  # --- fused expert calls: buffers and warm-up ----------------------------------------------

  def _class_top_k(self, c: int) -> int:
    return max(m.cfg.top_k for m in self.models.values()
               if any(m.cfg.moe_layers) and self.wpool.pool.model_class(m.model_id) == c)

  def _make_fused_buffers(self) -> None:
    pool = self.wpool.pool
    classes = {pool.model_class(m) for m, model in self.models.items()
               if any(model.cfg.moe_layers)}
    for c in classes:
      shape, slots = pool.classes[c].shape, pool.classes[c].slots_per_device
      k = self._class_top_k(c)
      dtype = jnp.dtype(shape.dtype)
      for d, dev in enumerate(self.wpool.devices):
        self._identity[c, d] = jax.device_put(np.arange(slots, dtype=np.int32), dev)
        for t in self.fused_token_buckets:
          self._fused_zeros[c, d, t] = jax.device_put(
              (np.zeros((t, shape.d_model), dtype), np.zeros((t, k), np.int32),
               np.zeros((t, k), np.float32), np.zeros(t, bool)), dev)

  def _warm_fused_calls(self, log=None) -> None:
    """Runs every fused shape once with all-padding members (stage, call, unstage)."""
    pool = self.wpool.pool
    members: dict[tuple[int, int], set] = {}
    for m, model in self.models.items():
      for layer, moe in enumerate(model.cfg.moe_layers):
        if moe:
          key = (pool.model_class(m), pool.home_device(m, layer))
          members.setdefault(key, set()).update(
              (t, model.cfg.top_k, model.cfg.num_experts) for t in self.token_buckets)
    for (c, d), shapes in sorted(members.items()):
      dev = self.wpool.devices[d]
      d_model, dtype = pool.classes[c].shape.d_model, jnp.dtype(pool.classes[c].shape.dtype)
      for fused in self.fused_token_buckets:
        for t, k, e in sorted(shapes):
          h, ids, w, valid, table = jax.device_put(
              (np.zeros((t, d_model), dtype), np.zeros((t, k), np.int32),
               np.zeros((t, k), np.float32), np.zeros(t, bool), np.arange(e, dtype=np.int32)),
              dev)
          staged = _stage(*self._fused_zeros[c, d, fused], h, ids, w, valid, table,
                          np.int32(0))
          y = stages.routed_experts(*staged, self._identity[c, d], *self.wpool.buffers(c, d),
                                    impl=self.moe_impl)
          jax.block_until_ready(_unstage(y, valid, np.int32(0)))
        self._warm_fused.add((c, d, fused))
        if log:
          log(f"compiled fused experts class={c} device={d} tokens={fused}")

  # --- steps --------------------------------------------------------------------------------

  def _split(self, batch: ModelBatch) -> list[ModelBatch]:
    n = len(batch.requests)
    parts = min(self.micro_batches, n)
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [ModelBatch(batch.model_id, batch.requests[a:b], batch.num_new[a:b])
            for a, b in itertools.pairwise(bounds) if b > a]

  def run_many(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    """Runs every batch of an iteration through the pipeline; tokens per batch."""
    parts, owner = [], []
    for i, batch in enumerate(batches):
      for part in self._split(batch):
        parts.append(part)
        owner.append(i)
    mbs = []
    for j, part in enumerate(parts):
      bucket = token_bucket(self.token_buckets, part, self.max_batch)
      if (part.model_id, bucket) not in self._warm:
        raise RuntimeError(f"bucket ({part.model_id}, {bucket}) was not compiled at start-up")
      with blame([part.model_id]):
        mbs.append(self._prepare(j, self.models[part.model_id], part, bucket))
    tokens = self._run_micro_batches(mbs, track=True)
    self.steps += 1
    out = [[] for _ in batches]
    for i, t in zip(owner, tokens, strict=True):
      out[i].append(t)
    return [np.concatenate(t) for t in out]

  def _prepare(self, index: int, model: LoadedModel, batch: ModelBatch,
               bucket: int) -> _MicroBatch:
    paged, sampling, next_pos = pack_batch(self.kv_pool, batch, bucket, self.max_batch)
    valid_host = paged[model.group].positions_T >= 0
    paged = [jax.device_put(b, d) for b, d in zip(paged, self.kv_devices, strict=True)]
    home = paged[model.group]
    sampling, next_pos = jax.device_put((sampling, next_pos), self.kv_devices[model.group])
    x_TD, valid_T = stages.embed(model.params["embed_VD"], home.tokens_T, home.positions_T)
    return _MicroBatch(index, model, batch, paged, sampling, next_pos, valid_T, valid_host, x_TD)

  def _run_micro_batches(self, mbs: list[_MicroBatch], *, track: bool) -> list[np.ndarray]:
    """Raises `StepError` naming the models of the stage that raised."""
    depth = max(mb.model.cfg.num_layers for mb in mbs)
    for layer in range(depth):
      live = [mb for mb in mbs if layer < mb.model.cfg.num_layers]
      for mb in live:  # attention of this layer for every micro-batch ...
        with blame([mb.model.model_id]):
          self._attention(mb, layer, track)
      moe = [mb for mb in live if mb.model.cfg.moe_layers[layer]]
      if self.fuse_experts:  # ... then their expert FFNs (ping-pong between the pools)
        self._fused_ffn(moe, layer, track)
      else:
        for mb in moe:
          with blame([mb.model.model_id]):
            self._ffn(mb, layer, track)
    out = []
    for mb in mbs:
      with blame([mb.model.model_id]):
        tokens_S = stages.head_and_sample(mb.model.params, mb.x_TD,
                                          mb.paged[mb.home].cu_q_lens_S1, mb.sampling,
                                          mb.next_pos, cfg=mb.model.cfg)
        out.append(tokens_S)
    return [np.asarray(t)[:len(mb.batch.requests)] for t, mb in zip(out, mbs, strict=True)]

  def _track(self, track, out, mbs, layer, kind, device):
    if track:
      mbs = mbs if isinstance(mbs, list) else [mbs]
      self.timeline.track(out, step=self.steps, micro_batch=mbs[0].index,
                          model=mbs[0].model.model_id, layer=layer, kind=kind,
                          device=str(device), members=tuple(mb.index for mb in mbs),
                          models=tuple(mb.model.model_id for mb in mbs))

  def _attention(self, mb: _MicroBatch, layer: int, track: bool) -> None:
    cfg, p = mb.model.cfg, mb.model.params["layers"][layer]
    home = self.kv_devices[mb.home]
    q, k, v = stages.attention_inputs(p, mb.x_TD, mb.paged[mb.home].positions_T, cfg=cfg)
    outs, lses = [], []
    for d, (b, dev) in enumerate(zip(mb.paged, self.kv_devices, strict=True)):
      on_home = d == mb.home  # no transfer (and no dispatch of one) to the home device itself
      o, lse, self.kv_buffers[d] = stages.write_and_attend_paged(
          self.kv_buffers[d], *((q, k, v) if on_home else jax.device_put((q, k, v), dev)), b,
          layer, cfg=cfg, impl=self.attn_impl)
      self._track(track, o, mb, layer, "attention", dev)
      if not on_home:
        o, lse = jax.device_put((o, lse), home)
      outs.append(o)
      lses.append(lse)
    result = stages.post_attention(p, mb.x_TD, outs, lses, cfg=cfg, moe=cfg.moe_layers[layer])
    self._track(track, result, mb, layer, "merge_router", home)
    if cfg.moe_layers[layer]:
      mb.moe = result
    else:
      (mb.x_TD,) = result

  def _chosen_experts(self, mb: _MicroBatch) -> np.ndarray:
    """The experts the router chose for the valid tokens (waits for the routing)."""
    if not mb.valid_host.any():
      return np.zeros(0, np.int32)
    return np.unique(np.asarray(mb.moe[2])[mb.valid_host])

  def _ffn(self, mb: _MicroBatch, layer: int, track: bool) -> None:
    """The expert FFN of one micro-batch alone (`fuse_experts=False`)."""
    cfg = mb.model.cfg
    model_id = mb.model.model_id
    x_TD, h_TD, ids_TK, weights_TK = mb.moe
    experts = self._chosen_experts(mb)
    self.wpool.access(model_id, layer, experts.tolist())
    slot_table_E, buffers = self.wpool.layer_inputs(model_id, layer)
    wdev = slot_table_E.devices().pop()
    moved = jax.device_put((h_TD, ids_TK, weights_TK, mb.valid_T), wdev)
    self._track(track, moved, mb, layer, "transfer_to_weights", wdev)
    y_TD = stages.routed_experts(*moved, slot_table_E, *buffers, impl=self.moe_impl)
    self._track(track, y_TD, mb, layer, "experts", wdev)
    y_TD = jax.device_put(y_TD, self.kv_devices[mb.home])
    self._track(track, y_TD, mb, layer, "transfer_back", self.kv_devices[mb.home])
    mb.x_TD = stages.combine(mb.model.params["layers"][layer]["ffn"], x_TD, h_TD, y_TD,
                             cfg=cfg)
    mb.moe = None
    if track:
      self.expert_calls += 1
      self.expert_members += 1

  def _fused_ffn(self, mbs: list[_MicroBatch], layer: int, track: bool) -> None:
    """The expert FFNs of a layer's micro-batches, one call per (class, weights device) group
    (more where the group's experts or tokens do not fit one call)."""
    pool = self.wpool.pool
    groups: dict[tuple[int, int], list[_MicroBatch]] = {}
    for mb in mbs:
      key = (pool.model_class(mb.model.model_id), pool.home_device(mb.model.model_id, layer))
      groups.setdefault(key, []).append(mb)
    for (c, d), members in groups.items():
      with blame([mb.model.model_id for mb in members]):
        self._fused_group(members, layer, c, d, track)

  def _fused_group(self, members: list[_MicroBatch], layer: int, c: int, d: int,
                   track: bool) -> None:
    """The expert FFNs of one (class, weights device) group of a layer's micro-batches."""
    wdev = self.wpool.devices[d]
    moved = {}
    for mb in members:  # the transfers need no routing decision: issue them first
      _, h_TD, ids_TK, weights_TK = mb.moe
      moved[mb.index] = jax.device_put((h_TD, ids_TK, weights_TK, mb.valid_T), wdev)
      self._track(track, moved[mb.index], mb, layer, "transfer_to_weights", wdev)
    chosen = {mb.index: self._chosen_experts(mb) for mb in members}
    calls = self._plan_fused_calls(members, chosen, layer)
    if track and len(calls) > 1:
      self.expert_splits += 1
    for call in calls:
      self._fused_call(call, moved, chosen, layer, c, d, track)

  def _plan_fused_calls(self, members, chosen, layer) -> list[list[_MicroBatch]]:
    """Members cut, in order, into calls whose experts fit the partition's slots together and
    whose valid tokens fit the largest fused bucket."""
    calls, keys, tokens = [], set(), 0
    for mb in members:
      mine = {(mb.model.model_id, layer, int(e)) for e in chosen[mb.index]}
      if calls and (tokens + mb.num_tokens > self.fused_token_buckets[-1]
                    or not self.wpool.pool.can_hold(keys | mine)):
        calls.append([])
        keys, tokens = set(), 0
      if not calls:
        calls.append([])
      calls[-1].append(mb)
      keys |= mine
      tokens += mb.num_tokens
    return calls

  def _fused_call(self, call: list[_MicroBatch], moved, chosen, layer: int, c: int, d: int,
                  track: bool) -> None:
    self.wpool.access_many([(mb.model.model_id, layer, chosen[mb.index].tolist())
                            for mb in call])
    wdev = self.wpool.devices[d]
    total = sum(mb.num_tokens for mb in call)
    fused = self.fused_token_buckets[bisect.bisect_left(self.fused_token_buckets, total)]
    if (c, d, fused) not in self._warm_fused and track:
      raise RuntimeError(f"fused expert call (class {c}, device {d}, {fused} tokens) was not "
                         f"compiled at start-up")
    staged, offsets, offset = self._fused_zeros[c, d, fused], [], 0
    for mb in call:
      table = jax.device_put(self.wpool.pool.slot_table(mb.model.model_id, layer), wdev)
      staged = _stage(*staged, *moved[mb.index], table, np.int32(offset))
      offsets.append(offset)
      offset += mb.num_tokens
    y_UD = stages.routed_experts(*staged, self._identity[c, d], *self.wpool.buffers(c, d),
                                 impl=self.moe_impl)
    self._track(track, y_UD, call, layer, "experts", wdev)
    for mb, offset in zip(call, offsets, strict=True):
      home = self.kv_devices[mb.home]
      y_TD = jax.device_put(_unstage(y_UD, moved[mb.index][3], np.int32(offset)), home)
      self._track(track, y_TD, mb, layer, "transfer_back", home)
      x_TD, h_TD, _, _ = mb.moe
      mb.x_TD = stages.combine(mb.model.params["layers"][layer]["ffn"], x_TD, h_TD, y_TD,
                               cfg=mb.model.cfg)
      mb.moe = None
    if track:
      self.expert_calls += 1
      self.expert_members += len(call)
