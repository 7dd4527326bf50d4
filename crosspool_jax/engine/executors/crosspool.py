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
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.executors.api import (
    HostCounters,
    LoadedModel,
    LocalTransfers,
    Transfers,
    blame,
)
from crosspool_jax.engine.executors.batching import (
    PackedLayout,
    decode_limits,
    decode_slots,
    decode_stopped,
    pack,
    pack_batch,
    step_arrays,
    step_inputs,
    token_bucket,
    unpack,
)
from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models import stages
from crosspool_jax.models.paged import PagedBatch
from crosspool_jax.models.sampling import NO_TOKEN
from crosspool_jax.pools.kv_buffers import allocate_kv_buffer
from crosspool_jax.pools.kv_pool import KVPool
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool
from crosspool_jax.pools.weights_pool import SwapPlan, WeightsPool


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
  """Which devices (indices into `jax.devices()`) form the KV pool and the weights pool."""

  kv_devices: tuple[int, ...]
  weight_devices: tuple[int, ...]

  def check(self) -> None:
    """ValueError for an empty pool or a device in both (no device is asked for)."""
    if not self.kv_devices:
      raise ValueError("device split: the KV pool has no devices")
    if not self.weight_devices:
      raise ValueError("device split: the weights pool has no devices")
    overlap = set(self.kv_devices) & set(self.weight_devices)
    if overlap:
      raise ValueError(f"device split: devices {sorted(overlap)} are in both pools")

  def resolve(self) -> tuple[list[jax.Device], list[jax.Device]]:
    """The devices; ValueError as `check`, or for an index out of range."""
    self.check()
    devices = jax.devices()
    bad = [d for d in (*self.kv_devices, *self.weight_devices) if not 0 <= d < len(devices)]
    if bad:
      raise ValueError(f"device split: indices {bad} out of range ({len(devices)} devices)")
    return [devices[d] for d in self.kv_devices], [devices[d] for d in self.weight_devices]


class Timeline:
  """Start (host issue) and end (output ready) of each stage, per micro-batch and layer.

  `track` stamps the end from a watcher thread (the stages of a pipelined step); a caller that
  waits for its outputs itself (the colocated executor) gives both times to `record` and needs
  no watcher (`watchers=0`).
  """

  def __init__(self, enabled: bool = True, *, watchers: int = 4):
    self.enabled = enabled
    self.events: list[dict] = []
    self._queue: queue.Queue = queue.Queue()
    self._threads = []
    if enabled:
      for _ in range(watchers):  # a few, so one slow stage does not delay the others' stamps
        t = threading.Thread(target=self._watch, daemon=True)
        t.start()
        self._threads.append(t)

  @staticmethod
  def _event(step, micro_batch, model, layer, kind, device, members, models) -> dict:
    return {"step": step, "micro_batch": micro_batch, "model": model, "layer": layer,
            "kind": kind, "device": device, "start": time.perf_counter(), "end": None,
            "members": list(members or (micro_batch,)), "models": list(models or (model,)),
            "discarded": False}  # set for a speculative run that missed (rerun after it)

  def track(self, out, *, step: int, micro_batch: int, model: str, layer: int, kind: str,
            device: str, members: tuple[int, ...] | None = None,
            models: tuple[str, ...] | None = None) -> None:
    """Records a stage issued now whose output is `out`.

    A fused expert call passes its member micro-batches and their models (`members`,
    `models`); `micro_batch` / `model` are then its first member's.
    """
    if not self.enabled:
      return
    if not self._threads:
      raise RuntimeError("Timeline.track needs watcher threads (watchers > 0); use record")
    event = self._event(step, micro_batch, model, layer, kind, device, members, models)
    self.events.append(event)
    self._queue.put((event, out))

  def record(self, *, start: float, end: float, step: int, micro_batch: int, model: str,
             layer: int, kind: str, device: str, members: tuple[int, ...] | None = None,
             models: tuple[str, ...] | None = None) -> None:
    """Records a stage whose start and end (`time.perf_counter()`) the caller measured."""
    if not self.enabled:
      return
    event = self._event(step, micro_batch, model, layer, kind, device, members, models)
    event["start"], event["end"] = start, end
    self.events.append(event)

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
    Expert swap-ins are not stages of a micro-batch and are left out.

    Returns {"overlap_fraction", "busy_s", "overlap_s", "transfers_concurrent_with_compute"}
    where the last counts transfers of one micro-batch in flight while a compute stage of
    other micro-batches of the same step was in flight.
    """
    self.wait()
    busy = overlapped = 0.0
    concurrent = 0
    stages = [e for e in self.events if not e["kind"].startswith("swap")]
    for step in sorted({e["step"] for e in stages}):
      evs = [e for e in stages if e["step"] == step and e["end"] is not None]
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


@dataclasses.dataclass(frozen=True)
class ExpertMessage:
  """What a weights device gets of a micro-batch's MoE layer: ONE uint8 array `msg_TO` [T,
  row_bytes] (one transfer where there were four) holding, per token, the bytes of its FFN
  input h_TD (`dtype`), its router's ids_TK (int32) and weights_TK (float32), and its valid
  flag, side by side. Bit-exact both ways (NaN weights of padding rows included). Hashable: a
  static jit argument, one per (d_model, top_k, dtype)."""

  d_model: int
  top_k: int
  dtype: str

  @property
  def _widths(self) -> tuple[int, int, int, int]:
    return self.d_model * jnp.dtype(self.dtype).itemsize, 4 * self.top_k, 4 * self.top_k, 1

  @property
  def row_bytes(self) -> int:
    return sum(self._widths)

  def pack(self, h_TD, ids_TK, weights_TK, valid_T) -> jax.Array:
    """The message (traced); ValueError if the arrays are not this layout's."""
    t = h_TD.shape[0]
    want = ((t, self.d_model), self.dtype), ((t, self.top_k), "int32")
    got = (h_TD.shape, h_TD.dtype.name), (ids_TK.shape, ids_TK.dtype.name)
    if got != want or weights_TK.shape != ids_TK.shape or valid_T.shape != (t,):
      raise ValueError(f"expert message {self}: got h {got[0]}, ids {got[1]}, weights "
                       f"{weights_TK.shape}, valid {valid_T.shape}")
    parts = [jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(t, -1) for a in
             (h_TD, ids_TK, weights_TK.astype(jnp.float32))]
    return jnp.concatenate([*parts, valid_T.astype(jnp.uint8)[:, None]], axis=1)

  def unpack(self, msg_TO) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(h_TD, ids_TK, weights_TK, valid_T) of a message (traced)."""
    t, out, start = msg_TO.shape[0], [], 0
    for width, (dtype, n) in zip(self._widths[:3], ((self.dtype, self.d_model),
                                                    ("int32", self.top_k),
                                                    ("float32", self.top_k)), strict=True):
      size = jnp.dtype(dtype).itemsize
      part = msg_TO[:, start:start + width].reshape(t, n, size)
      out.append(jax.lax.bitcast_convert_type(part if size > 1 else part[..., 0], dtype))
      start += width
    return (*out, msg_TO[:, start] != 0)

  def host_ids(self, msg_TO: np.ndarray) -> np.ndarray:
    """The router's ids_TK of a message read to the host (the sync path's routing)."""
    start = self._widths[0]
    return np.ascontiguousarray(msg_TO[:, start:start + self._widths[1]]).view(np.int32)


def expert_message(cfg, params) -> ExpertMessage:
  """The layout of a model's expert messages (its activations have its embedding's dtype)."""
  return ExpertMessage(cfg.d_model, cfg.top_k, params["embed_VD"].dtype.name)


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "impl", "message"),
                   donate_argnames=("pool_PE",))
def _attention_side(p, x_TD, pool_PE, batch: PagedBatch, layer, pending=None, *, cfg, moe: bool,
                    impl, message: ExpertMessage):
  """`stages.attention_side`, a MoE layer's outputs (x_TD, h_TD, its `message`): one program."""
  result, pool_PE = stages.attention_side(p, x_TD, pool_PE, batch, layer, pending, cfg=cfg,
                                          moe=moe, impl=impl)
  if moe:
    x_TD, h_TD, ids_TK, weights_TK = result
    result = x_TD, h_TD, message.pack(h_TD, ids_TK, weights_TK, batch.positions_T >= 0)
  return result, pool_PE


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "absorbed", "message"))
def _post_attention(p, x_TD, outs_MTNH, lses_MTN, valid_T, *, cfg, moe: bool, absorbed: bool,
                    message: ExpertMessage):
  """`stages.post_attention`, a MoE layer's outputs (x_TD, h_TD, its `message`)."""
  result = stages.post_attention(p, x_TD, outs_MTNH, lses_MTN, cfg=cfg, moe=moe,
                                 absorbed=absorbed)
  if moe:
    x_TD, h_TD, ids_TK, weights_TK = result
    result = x_TD, h_TD, message.pack(h_TD, ids_TK, weights_TK, valid_T)
  return result


@functools.partial(jax.jit, donate_argnames=("used_NRE",), static_argnames=("message",))
def _stage(x_UD, slots_UK, weights_UK, valid_U, used_NRE, msg_TO, tables_RE, row, offset, step,
           *, message: ExpertMessage):
  """Packs one member micro-batch into a fused expert call's inputs (returns them updated).

  Its valid tokens go to rows offset, offset + 1, ... of the fused bucket (U rows), its expert
  ids become slot ids of the class buffer through its layer's slot table `tables_RE[row]` (so
  the fused call uses the identity slot table), a top_k smaller than the fused K_f is padded
  with weight-0 repeats of the first choice (a resident slot: exact no-op), and the experts its
  valid tokens chose are marked in `used_NRE[step, row]` (read by the host after the run).

  Args:
    x_UD, slots_UK, weights_UK (f32), valid_U: the fused inputs so far.
    used_NRE: bool [steps, rows, E'] experts chosen per step of the run and slot-table row
      (donated).
    msg_TO: the member's `message` (h_TD, ids_TK, weights_TK, valid_T) on the weights device.
    tables_RE: int32 [rows, E'] slot tables of the layers homed on this device.
    row, offset, step: int32 scalars: the member layer's row, the fused row of its first valid
      token, the run's step (0 but in a multi-step chunk).
  """
  h_TD, ids_TK, weights_TK, valid_T = message.unpack(msg_TO)
  U, K_f = slots_UK.shape
  K = ids_TK.shape[1]
  rank_T = jnp.cumsum(valid_T.astype(jnp.int32)) - 1
  rows_T = jnp.where(valid_T, offset + rank_T, U)  # U: out of range, dropped
  slots_TK = jnp.take(tables_RE[row], ids_TK, mode="clip")
  weights_TK = weights_TK.astype(jnp.float32)
  if K < K_f:
    slots_TK = jnp.concatenate([slots_TK, jnp.repeat(slots_TK[:, :1], K_f - K, axis=1)], 1)
    weights_TK = jnp.pad(weights_TK, ((0, 0), (0, K_f - K)))
  drop = dict(mode="drop")
  return (x_UD.at[rows_T].set(h_TD.astype(x_UD.dtype), **drop),
          slots_UK.at[rows_T].set(slots_TK, **drop),
          weights_UK.at[rows_T].set(weights_TK, **drop),
          valid_U.at[rows_T].set(valid_T, **drop),
          _mark_used(used_NRE, step, row, ids_TK, valid_T))


def _mark_used(used_NRE, step, row, ids_TK, valid_T):
  """`used_NRE[step, row]` with the experts the valid tokens chose set (padding: dropped)."""
  chosen_TK = jnp.where(valid_T[:, None], ids_TK, used_NRE.shape[2])
  return used_NRE.at[step, row, chosen_TK].set(True, mode="drop")


@functools.partial(jax.jit, donate_argnames=("used_NRE",), static_argnames=("impl", "message"))
def _expert_call(used_NRE, msg_TO, tables_RE, row, step, identity_S, w_gate_SDF, w_up_SDF,
                 w_down_SFD, *, impl, message: ExpertMessage):
  """An expert call of ONE member micro-batch (its `message`) in one program, no fused bucket:
  the same arithmetic per token as `_stage`, the call and `_unstage` (input in the class dtype,
  expert ids made slot ids through `tables_RE[row]`, the identity slot table, f32 weights,
  padding rows zero), and the chosen experts marked in `used_NRE[step, row]` (donated)."""
  h_TD, ids_TK, weights_TK, valid_T = message.unpack(msg_TO)
  y_TD = stages.routed_experts(h_TD.astype(w_gate_SDF.dtype),
                               jnp.take(tables_RE[row], ids_TK, mode="clip"),
                               weights_TK.astype(jnp.float32), valid_T, identity_S,
                               w_gate_SDF, w_up_SDF, w_down_SFD, impl=impl)
  return (jnp.where(valid_T[:, None], y_TD, jnp.zeros((), y_TD.dtype)),
          _mark_used(used_NRE, step, row, ids_TK, valid_T))


@functools.partial(jax.jit, static_argnames=("message",))
def _unstage(y_UD, msg_TO, offset, *, message: ExpertMessage):
  """A member's expert output [T, D] cut from the fused one (padding rows zero, as unfused);
  its valid tokens from its `message`."""
  valid_T = message.unpack(msg_TO)[3]
  rows_T = jnp.where(valid_T, offset + jnp.cumsum(valid_T.astype(jnp.int32)) - 1, 0)
  return jnp.where(valid_T[:, None], y_UD[rows_T], jnp.zeros((), y_UD.dtype))


@functools.partial(jax.jit, donate_argnames=("tables_RE",))
def _write_rows(tables_RE, rows_N, values_NE):
  """Slot-table rows written in place (rows past the end are padding, dropped)."""
  return tables_RE.at[rows_N].set(values_NE, mode="drop")


_LIMITS = ("steps_S", "stop_ids_S4")  # `decode_limits`, packed when decode_steps > 1


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _none_used(tables_RE, *, num_steps: int):
  """A run's fresh `used_NRE` [num_steps, rows, E']: no expert chosen in any step. Computed
  from the tables: a jit output that depends on no input is uncommitted, on the default
  device (a later call would recompile)."""
  return jnp.broadcast_to(tables_RE != tables_RE, (num_steps, *tables_RE.shape))


@functools.partial(jax.jit, static_argnames=("layout",))
def _unpack_and_embed(packed_N, embed_VD, *, layout: PackedLayout):
  """A micro-batch's packed inputs on its home KV device: (PagedBatch, sampling, next
  positions, token embeddings x_TD, valid mask valid_T, its `decode_limits` if packed)."""
  arrays = unpack(packed_N, layout)
  batch, sampling, next_positions_S = step_inputs(arrays)
  return (batch, sampling, next_positions_S,
          *stages.embed(embed_VD, batch.tokens_T, batch.positions_T),
          {k: arrays[k] for k in _LIMITS if k in arrays})


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _chunk_start(steps_S, *, num_steps: int):
  """A multi-step decode's state on a micro-batch's home device: (live sequences: those that
  may generate, tokens generated so far [S], tokens [S, num_steps] all `NO_TOKEN`)."""
  return (steps_S > 0, jnp.zeros_like(steps_S),
          jnp.full((steps_S.shape[0], num_steps), NO_TOKEN, jnp.int32))


def _fit(a, size: int, fill: int = 0):
  """`a` cut or padded (with `fill`) along its last axis to `size` (sequences -> tokens)."""
  n = a.shape[-1]
  if n >= size:
    return a[..., :size]
  return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, size - n)], constant_values=fill)


@functools.partial(jax.jit, static_argnames=("page_tokens",), donate_argnames=("out_SN",))
def _advance(embed_VD, batch: PagedBatch, next_pos_S, tokens_S, alive_S, count_S, limits,
             out_SN, step, *, page_tokens: int):
  """One decode step of a multi-step chunk ends and the next one's inputs follow, on device.

  Each live sequence's sampled token `tokens_S` is recorded in column `step` of `out_SN`
  (donated); a sequence stops on a stop id, an invalid token or its `steps_S`
  (`decode_stopped`). The next step feeds each live sequence its token at `next_pos_S` (KV
  slot from its page table, which holds the pages reserved for the chunk); a stopped one
  becomes padding (position -1, KV slot 0: the null page). Decode batches hold one token per
  sequence, row i of T for sequence i. Returns (next PagedBatch, next positions, live, counts,
  out_SN, token embeddings x_TD, valid_T).
  """
  out_SN = out_SN.at[:, step].set(jnp.where(alive_S, tokens_S, NO_TOKEN))
  count_S = count_S + alive_S
  alive_S = alive_S & ~decode_stopped(tokens_S, count_S, limits["steps_S"],
                                      limits["stop_ids_S4"])
  t = batch.tokens_T.shape[0]
  fed = dataclasses.replace(
      batch, tokens_T=_fit(jnp.where(alive_S, tokens_S, 0), t),
      positions_T=_fit(jnp.where(alive_S, next_pos_S, -1), t, fill=-1),
      kv_lens_S=jnp.where(jnp.arange(alive_S.shape[0]) < batch.num_seqs_1[0],
                          next_pos_S + alive_S, 0),
      slot_mapping_LT=_fit(decode_slots(batch.page_tables_LSP, next_pos_S, alive_S,
                                        page_tokens), t))
  return (fed, next_pos_S + alive_S, alive_S, count_S, out_SN,
          *stages.embed(embed_VD, fed.tokens_T, fed.positions_T))


@functools.partial(jax.jit, static_argnames=("layout",))
def _unpack(packed_N, *, layout: PackedLayout):
  """A micro-batch's packed inputs on another KV device holding some of its pages."""
  return step_inputs(unpack(packed_N, layout))[0]


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def split_micro_batches(batch: ModelBatch, micro_batches: int, min_tokens: int
                        ) -> list[ModelBatch]:
  """A model batch cut into up to `micro_batches` parts of consecutive requests, only as many
  as give each part `min_tokens` tokens (0: always), never an empty one."""
  n = len(batch.requests)
  parts = min(micro_batches, n, max(1, batch.num_tokens // max(1, min_tokens)))
  bounds = np.linspace(0, n, parts + 1).round().astype(int)
  return [ModelBatch(batch.model_id, batch.requests[a:b], batch.num_new[a:b],
                     None if batch.decode_steps is None else batch.decode_steps[a:b])
          for a, b in itertools.pairwise(bounds) if b > a]


def ping_pong(batches: list[ModelBatch], micro_batches: int, min_tokens: int
              ) -> list[tuple[int, int, ModelBatch]]:
  """A step's model batches cut into micro-batches (`split_micro_batches`), each with a phase
  of the pipeline in [0, micro_batches): the parts of one batch take distinct phases, the
  least loaded so far in tokens (ties: the lowest), in ascending order; so a batch too small
  to cut still alternates with other models' batches. Returns (phase, owner batch index, part)
  sorted by phase (stable: a batch's parts stay in order).

  The executor issues the micro-batches phase by phase and fuses expert calls only within a
  phase (`expert_group`): one phase's expert calls run on the weights devices while the next
  phase's attention runs on the KV devices (the ping-pong); fused across phases, a call would
  wait for every micro-batch's attention and nothing would overlap.
  """
  load = [0] * micro_batches
  out = []
  for owner, batch in enumerate(batches):
    parts = split_micro_batches(batch, micro_batches, min_tokens)
    phases = sorted(sorted(range(micro_batches), key=lambda p: (load[p], p))[:len(parts)])
    for phase, part in zip(phases, parts, strict=True):
      load[phase] += part.num_tokens
      out.append((phase, owner, part))
  return sorted(out, key=lambda x: x[0])


def expert_group(pool: WeightsPool, model_id: str, layer: int, phase: int
                 ) -> tuple[int, int, int]:
  """The expert-call group of a micro-batch's MoE layer: (phase, shape class, home weights
  device); calls fuse members of one group only (`plan_expert_calls`)."""
  return phase, pool.model_class(model_id), pool.home_device(model_id, layer)


def plan_expert_calls(members: list, tokens: list[int], keys: list[set], *, fuse: bool,
                      max_tokens: int, can_hold) -> list[list]:
  """A layer's (class, weights device) group of micro-batches cut, in order, into expert
  calls: one member per call without `fuse`; else members join a call while its valid tokens
  fit `max_tokens` (the largest fused bucket) and their experts `keys` (empty when the
  routing is not known yet) fit the partition's slots together (`can_hold`)."""
  calls, held, total = [], set(), 0
  for member, n, mine in zip(members, tokens, keys, strict=True):
    if calls and (not fuse or total + n > max_tokens or not can_hold(held | mine)):
      calls.append([])
      held, total = set(), 0
    if not calls:
      calls.append([])
    calls[-1].append(member)
    held |= mine
    total += n
  return calls


def predict_resident(pool: WeightsPool, layers: Iterable[tuple[str, int]],
                     last_chosen: Mapping[tuple[str, int], Iterable[int]]
                     ) -> list[dict[tuple[str, int], list[int]]]:
  """The experts to make resident before a step whose MoE layers are `layers` ((model, layer)
  pairs): per (shape class, home weights device) partition they use, in order of first use,
  {(model, layer): experts}. Every expert of the partition's layers if they all fit its slots
  together (`can_hold`), else each layer's choice in its model's last step (`last_chosen`:
  none for a layer not run yet). A pure function of the pool's state and the last choices:
  the executor and the simulator both apply it (`prefetch_predicted`), so they predict alike.
  """
  wanted: dict[tuple[int, int], dict[tuple[str, int], None]] = {}
  for m, layer in layers:
    wanted.setdefault((pool.model_class(m), pool.home_device(m, layer)), {})[m, layer] = None
  predicted = []
  for part in wanted.values():
    every = [(m, layer, e) for m, layer in part for e in range(pool.models[m].num_experts)]
    if pool.can_hold(every):
      predicted.append({(m, layer): list(range(pool.models[m].num_experts))
                        for m, layer in part})
    else:
      predicted.append({k: [int(e) for e in last_chosen.get(k, ())] for k in part})
  return predicted


def prefetch_predicted(prefetch: Callable[..., SwapPlan],
                       predicted: list[dict[tuple[str, int], list[int]]]
                       ) -> list[tuple[tuple[str, int], SwapPlan]]:
  """Issues `predict_resident`'s prediction through `prefetch` (`WeightsPool.prefetch`, or
  `DeviceWeightsPool.prefetch` which also performs the loads), partition by partition, with
  every expert predicted in the partition protected, so one layer's loads never evict
  another's predicted experts. Returns each layer's plan ((model, layer), `SwapPlan`)."""
  plans = []
  for part in predicted:
    protect = {(m, layer, e) for (m, layer), es in part.items() for e in es}
    for (m, layer), es in part.items():
      plans.append(((m, layer), prefetch(m, layer, es, protect=protect)))
  return plans


def chosen_by_partition(pool: WeightsPool, chosen: Mapping[tuple[str, int], Iterable[int]]
                        ) -> list[list[tuple[str, int, list[int]]]]:
  """What a step's layers chose ((model, layer) -> experts) as (model, layer, experts), one list
  per (class, weights device) partition: what one `access_many` makes resident together."""
  by_part: dict[tuple[int, int], list] = {}
  for (m, layer), es in chosen.items():
    part = (pool.model_class(m), pool.home_device(m, layer))
    by_part.setdefault(part, []).append((m, layer, [int(e) for e in es]))
  return list(by_part.values())


def holds_together(pool: WeightsPool, by_part: list[list[tuple[str, int, list[int]]]]) -> bool:
  """Whether each partition of `chosen_by_partition` can hold its share at once (`can_hold`):
  the condition for retrying a missed step (else it takes the sync path). Shared by the
  executor and the simulator."""
  return all(pool.can_hold({(m, layer, e) for m, layer, es in requests for e in es})
             for requests in by_part)


@dataclasses.dataclass
class _MicroBatch:
  index: int
  phase: int  # of the ping-pong (`ping_pong`)
  model: LoadedModel
  batch: ModelBatch
  paged: dict  # KV device -> its PagedBatch, on it: the home device and those holding pages
  sampling: dict  # on the home KV device
  next_pos: jax.Array  # on the home KV device
  valid_T: jax.Array  # on the home KV device
  valid_host: np.ndarray  # bool [T], the same on the host
  x_TD: jax.Array
  limits: dict  # on the home KV device: `decode_limits` when packed (decode_steps > 1)
  moe: tuple | None = None  # (x_TD after attention, h_TD, its `ExpertMessage`) between stages
  pending: tuple | None = None  # (p_ffn, h_TD, y_TD) of a MoE layer awaiting its combine

  @property
  def home(self) -> int:
    """Index of the model's home KV device."""
    return self.model.group

  @functools.cached_property
  def message(self) -> ExpertMessage:
    return expert_message(self.model.cfg, self.model.params)

  @property
  def num_tokens(self) -> int:
    return int(self.valid_host.sum())


@dataclasses.dataclass
class _Tables:
  """The slot tables of the MoE layers homed on one weights device, on it (rows: layers)."""

  rows: dict  # (model_id, layer) -> row
  tables_RE: jax.Array  # int32 [rows, E'] slot of each expert (fillers where not resident)
  used_NRE: jax.Array  # bool, experts chosen in each step of the run (one but in a chunk)
  host_RE: np.ndarray  # the tables as last written
  resident_RE: np.ndarray  # bool: which of them were resident then


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
    micro_batch_min_tokens: cut a batch only if each part gets at least this many tokens.
    attn_impl, moe_impl: kernel implementations.
    timeline_every: record the per-stage timeline of every Nth step (0: none).
    fuse_experts: micro-batches of one shape class and home weights device share one expert
      call per layer (False: one call per micro-batch, the ablation).
    fused_token_buckets: padded token counts of an expert call (default: `token_buckets`); a
      group with more valid tokens than the largest is split over several calls.
    decode_steps: decode steps of one multi-step chunk (1: none). An iteration whose every
      batch is multi-step (`ModelBatch.decode_steps`) and whose pages are all on their home
      KV devices is enqueued as that many steps, each step's inputs made on device from the
      last one's tokens, with one read of all its tokens (`_run_chunk`).

  Attribute `transfers` moves arrays between devices and reads them (`LocalTransfers`: every
  device in this process); a multi-process backend sets its own before `compile_all`.
  """

  def __init__(self, models: dict[str, LoadedModel], kv_pool: KVPool,
               kv_buffers: list[jax.Array], wpool: DeviceWeightsPool, *,
               token_buckets: tuple[int, ...], max_batch: int, micro_batches: int = 2,
               micro_batch_min_tokens: int = 0,
               attn_impl: str | None = None, moe_impl: str | None = None,
               timeline_every: int = 1, fuse_experts: bool = True,
               fused_token_buckets: tuple[int, ...] | None = None, decode_steps: int = 1):
    if decode_steps < 1:
      raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
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
    wpool.on_swap = self._on_swap
    self.transfers: Transfers = LocalTransfers()
    self.token_buckets = tuple(token_buckets)
    self.max_batch = max_batch
    self.micro_batches = micro_batches
    self.micro_batch_min_tokens = micro_batch_min_tokens
    self.attn_impl = attn_impl
    self.moe_impl = moe_impl
    self.timeline = Timeline(timeline_every > 0)
    self.timeline_every = timeline_every
    self.fuse_experts = fuse_experts
    self.fused_token_buckets = tuple(sorted(set(fused_token_buckets or token_buckets)))
    if self.fused_token_buckets[-1] < self.token_buckets[-1]:
      raise ValueError(f"fused_token_buckets {self.fused_token_buckets} must reach the largest "
                       f"token bucket {self.token_buckets[-1]}")
    self.decode_steps = decode_steps
    self.steps = 0
    self.counters = HostCounters()
    self.expert_calls = 0  # expert-dispatch calls issued in served steps
    self.expert_members = 0  # micro-batches they served (one each when not fused)
    self.expert_splits = 0  # fused groups cut into several calls (slots or tokens)
    self.miss_steps = 0  # steps whose routing missed a resident expert: rerun with loads
    self.retry_runs = 0  # of them, rerun speculatively with what the missed run chose loaded
    self.retry_misses = 0  # retries that missed again (then the sync path)
    self.chunk_runs = 0  # multi-step decode chunks enqueued (`_run_chunk`)
    self.chunk_cuts = 0  # of them, cut at a later step that missed (the steps before it kept)
    self.chunk_reruns = 0  # of them, whose first step missed (the iteration ran one step)
    self.chunk_declined = 0  # multi-step iterations run as one step (`_chunk_steps`)
    self._chunk_backoff = False  # the last step run alone missed: no chunk until one hits
    self._tally = [0, 0, 0]  # calls, members, splits of the run in progress
    self._warm: set[tuple[str, int]] = set()
    # (class, weights device, tables shape, fused bucket | (tokens, ExpertMessage) of a
    # one-member call)
    self._warm_fused: set[tuple] = set()
    self._fused_zeros: dict[tuple[int, int, int], tuple] = {}
    self._identity: dict[tuple[int, int], jax.Array] = {}
    self._tables: dict[int, _Tables] = {}  # per weights device
    self._tables_version = -1
    self._scalars: dict[tuple[int, int], jax.Array] = {}
    self._layouts: dict[tuple[str, int], PackedLayout] = {}  # (model, bucket): packed inputs
    self._last_chosen: dict[tuple[str, int], np.ndarray] = {}  # experts of the last step
    self._tokens_read = False  # whether the step being run has read its tokens yet
    self.reads_before_tokens = 0  # blocking reads a step made before its tokens (sync path)
    self._warming = False  # compile_all / add_model running empty micro-batches
    self._tracking = False  # the step being run is recorded on the timeline

  @property
  def compile_count(self) -> int:
    """Warmed (model, token bucket) pairs plus warmed expert-call shapes: fused (class,
    device, bucket) and one-member (class, device, tokens, message layout)."""
    return len(self._warm) + len(self._warm_fused)

  def expert_call_stats(self) -> dict:
    """Expert-dispatch calls of served steps and the micro-batches they served; the steps
    whose speculative run missed a non-resident expert, their retries with its choices loaded,
    the retries that missed again, and blocking reads made before a step's tokens (the sync
    path's); multi-step decode chunks run, cut at a later step that missed, rerun as one step
    (the first missed), and declined (`_chunk_steps`)."""
    return {"fused": self.fuse_experts, "calls": self.expert_calls,
            "micro_batches": self.expert_members, "splits": self.expert_splits,
            "mean_members_per_call": (self.expert_members / self.expert_calls
                                      if self.expert_calls else 0.0),
            "miss_steps": self.miss_steps, "retry_runs": self.retry_runs,
            "retry_misses": self.retry_misses,
            "reads_before_tokens": self.reads_before_tokens,
            "chunk_runs": self.chunk_runs, "chunk_cuts": self.chunk_cuts,
            "chunk_reruns": self.chunk_reruns, "chunk_declined": self.chunk_declined}

  # --- host helpers: device scalars, counted transfers and reads ---------------------------

  def _scalar(self, device: jax.Device, value: int) -> jax.Array:
    """An int32 scalar on `device`, put once and kept (no per-call transfer)."""
    key = (device.id, int(value))
    if key not in self._scalars:
      self._scalars[key] = self._put(np.int32(value), device)
    return self._scalars[key]

  def _put(self, tree, device):
    """`jax.device_put` (`transfers.put`), counted; one call for a list of trees with a list
    of devices."""
    self.counters.transfers += len(jax.tree.leaves(tree))
    return self.transfers.put(tree, device)

  def _read(self, arrays: list) -> list:
    """One blocking device-to-host read of `arrays` (counted; not host time)."""
    with self.counters.blocked():
      out = self.transfers.read(arrays)
    self.counters.blocking_reads += len(arrays)
    if not self._tokens_read:
      self.reads_before_tokens += len(arrays)
    return out

  def _dispatched(self, n: int = 1) -> None:
    self.counters.dispatches += n

  # --- start-up and models -----------------------------------------------------------------

  def compile_all(self, log=None) -> int:
    """Lays out the slot tables, warms every (model, token bucket) with all-padding
    micro-batches (pages on the home device only, and on every KV device) and every expert
    call shape of every (class, weights device) with every member shape that can join it."""
    self._make_fused_buffers()
    self._layout_tables()
    for model_id in self.models:
      self._warm_model(model_id, log)
    self._warm_fused_calls(log)
    return self.compile_count

  def _warm_model(self, model_id: str, log=None) -> None:
    model = self.models[model_id]
    self._warming = True
    try:
      for bucket in self.token_buckets:
        empty = ModelBatch(model_id, [], [])
        for spread in (False, True):
          self._run_micro_batches(self._prepare([(model, empty, bucket, 0)], spread=spread),
                                  track=False, sync=False)
        if self.decode_steps > 1:  # a multi-step micro-batch of no sequence
          decode = ModelBatch(model_id, [], [], decode_steps=[])
          self._run_chunk(self._prepare([(model, decode, bucket, 0)]), 1, track=False)
        self._warm.add((model_id, bucket))
        if log:
          log(f"compiled {model_id} tokens={bucket}")
    finally:
      self._warming = False

  def add_model(self, model: LoadedModel, log=None) -> None:
    """Serves a model registered while running (its experts already in the weights pool, its
    params on its home KV device): warms its buckets, and the expert calls it may join
    (shapes already warmed compile nothing)."""
    self.models[model.model_id] = model
    self._make_fused_buffers()
    self._layout_tables()
    self._warm_model(model.model_id, log)
    self._warm_fused_calls(log)

  def remove_model(self, model_id: str) -> None:
    """Stops running a model (its experts are removed from the weights pool by the caller)."""
    del self.models[model_id]
    self._warm = {w for w in self._warm if w[0] != model_id}
    self._layouts = {k: v for k, v in self._layouts.items() if k[0] != model_id}
    self._last_chosen = {k: v for k, v in self._last_chosen.items() if k[0] != model_id}
    for t in self._tables.values():  # its rows stay, unused, until the next layout
      t.rows = {k: row for k, row in t.rows.items() if k[0] != model_id}

  def restore_lost_buffers(self) -> list[KVPool]:
    """Re-allocates the KV buffers a failed step consumed (donated, never returned), rebuilds
    lost weights-pool buffers and slot tables; returns [the KV pool] if KV pages were lost
    (its requests must be recomputed), else []."""
    self.wpool.restore_lost_buffers()
    if any(t.tables_RE.is_deleted() or t.used_NRE.is_deleted() for t in self._tables.values()):
      self._tables.clear()
      self._layout_tables()
    lost = []
    for d, buf in enumerate(self.kv_buffers):
      if buf.is_deleted():
        self.kv_buffers[d] = allocate_kv_buffer(self.kv_pool, self.kv_devices[d],
                                                dtype=buf.dtype)
        lost = [self.kv_pool]
    return lost

  # --- expert calls: buffers, slot tables and warm-up ---------------------------------------

  def _moe_models(self):
    return {m: model for m, model in self.models.items() if any(model.cfg.moe_layers)}

  def _class_top_k(self, c: int) -> int:
    return max(m.cfg.top_k for mid, m in self._moe_models().items()
               if self.wpool.pool.model_class(mid) == c)

  def _make_fused_buffers(self) -> None:
    pool = self.wpool.pool
    for c in {pool.model_class(m) for m in self._moe_models()}:
      shape, slots = pool.classes[c].shape, pool.classes[c].slots_per_device
      k = self._class_top_k(c)
      dtype = jnp.dtype(shape.dtype)
      for d, dev in enumerate(self.wpool.devices):
        self._identity[c, d] = self._put(np.arange(slots, dtype=np.int32), dev)
        for t in self.fused_token_buckets:
          self._fused_zeros[c, d, t] = self._put(
              (np.zeros((t, shape.d_model), dtype), np.zeros((t, k), np.int32),
               np.zeros((t, k), np.float32), np.zeros(t, bool)), dev)

  def _layout_tables(self) -> None:
    """Gives every MoE layer a row of its home weights device's slot tables. Shapes are
    powers of two (a model added later rarely changes them); new shapes are warmed."""
    pool = self.wpool.pool
    rows: dict[int, dict] = {d: {} for d in range(len(self.wpool.devices))}
    experts: dict[int, int] = dict.fromkeys(rows, 1)
    for m, model in self._moe_models().items():
      for layer, moe in enumerate(model.cfg.moe_layers):
        if moe:
          d = pool.home_device(m, layer)
          rows[d][m, layer] = len(rows[d])
          experts[d] = max(experts[d], model.cfg.num_experts)
    for d, dev in enumerate(self.wpool.devices):
      shape = (_pow2(max(1, len(rows[d]))), _pow2(experts[d]))
      old = self._tables.get(d)
      if old is not None and old.host_RE.shape == shape and old.rows == rows[d]:
        continue
      host = np.zeros(shape, np.int32)
      tables = self._put(host, dev)
      self._tables[d] = _Tables(rows[d], tables,
                                _none_used(tables, num_steps=self.decode_steps), host,
                                np.zeros(shape, bool))
      for n in {_pow2(k) for k in range(1, shape[0] + 1)}:  # warm every row-count bucket
        pad = self._put((np.full(n, shape[0], np.int32), np.zeros((n, shape[1]), np.int32)),
                        dev)
        self._tables[d].tables_RE = _write_rows(self._tables[d].tables_RE, *pad)
    self._tables_version = -1
    self._refresh_tables()

  def _refresh_tables(self) -> None:
    """Writes the slot-table rows whose residency changed since the last write (in place)."""
    pool = self.wpool.pool
    if self._tables_version == pool.version:
      return
    for d, t in self._tables.items():
      host, resident = np.zeros_like(t.host_RE), np.zeros_like(t.resident_RE)
      for (m, layer), row in t.rows.items():
        table = pool.slot_table(m, layer)
        host[row, :table.size] = table
        resident[row, :table.size] = pool.resident_mask(m, layer)
      changed = np.flatnonzero((host != t.host_RE).any(axis=1))
      if changed.size:
        n = _pow2(changed.size)
        rows = np.full(n, host.shape[0], np.int32)
        rows[:changed.size] = changed
        values = np.zeros((n, host.shape[1]), np.int32)
        values[:changed.size] = host[changed]
        t.tables_RE = _write_rows(t.tables_RE, *self._put((rows, values),
                                                          self.wpool.devices[d]))
        self._dispatched()
      t.host_RE, t.resident_RE = host, resident
    self._tables_version = pool.version

  def _warm_fused_calls(self, log=None) -> None:
    """Runs every expert call shape once with all-padding members: one-member calls, and
    fused ones (stage, call, unstage)."""
    pool = self.wpool.pool
    members: dict[tuple[int, int], set] = {}
    for m, model in self._moe_models().items():
      message = expert_message(model.cfg, model.params)
      for layer, moe in enumerate(model.cfg.moe_layers):
        if moe:
          key = (pool.model_class(m), pool.home_device(m, layer))
          members.setdefault(key, set()).update((t, message) for t in self.token_buckets)
    for (c, d), shapes in sorted(members.items(), key=lambda x: x[0]):
      dev, tables = self.wpool.devices[d], self._tables[d]
      key = (c, d, tables.host_RE.shape)
      zero = self._scalar(dev, 0)
      shapes = sorted(shapes, key=lambda s: (s[0], dataclasses.astuple(s[1])))
      padding = dict(zip(shapes, self._put([np.zeros((t, message.row_bytes), np.uint8)
                                            for t, message in shapes], [dev] * len(shapes)),
                         strict=True))
      for (t, message), msg in padding.items():  # one-member calls (`_expert_call`)
        if (*key, (t, message)) in self._warm_fused:
          continue
        y, tables.used_NRE = _expert_call(tables.used_NRE, msg, tables.tables_RE, zero, zero,
                                          self._identity[c, d], *self.wpool.buffers(c, d),
                                          impl=self.moe_impl, message=message)
        jax.block_until_ready(y)
        self._warm_fused.add((*key, (t, message)))
      for fused in self.fused_token_buckets:
        if (*key, fused) in self._warm_fused:
          continue
        for (_, message), msg in padding.items():
          *staged, tables.used_NRE = _stage(*self._fused_zeros[c, d, fused], tables.used_NRE,
                                            msg, tables.tables_RE, zero, zero, zero,
                                            message=message)
          y = stages.routed_experts(*staged, self._identity[c, d], *self.wpool.buffers(c, d),
                                    impl=self.moe_impl)
          jax.block_until_ready(_unstage(y, msg, zero, message=message))
        self._warm_fused.add((*key, fused))
        if log:
          log(f"compiled expert calls class={c} device={d} tokens={fused}")

  # --- steps --------------------------------------------------------------------------------

  def run_many(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    """Runs every batch of an iteration through the pipeline; tokens per batch.

    First speculatively, enqueued whole with no device read before the tokens, the experts it
    may route to made resident beforehand. If its routing chose a non-resident expert after
    all (a miss: its tokens are discarded), what it chose is loaded and it runs speculatively
    again (a retry: exact up to the first layer that missed, so each retry fixes at least that
    layer); if that cannot load (the choices do not fit a partition together) or misses again,
    it runs in the sync mode: a read of each layer's routing before its expert call, loading
    what it chose. Every rerun is exact: the same KV slots rewritten, the same sampling keys.

    An iteration with multi-step batches (`ModelBatch.decode_steps`, pages reserved for them)
    whose micro-batches' pages are all on their home KV devices runs as a chunk of decode
    steps (`_run_chunk`: no read between them, the experts predicted once before it; the
    iteration's other batches run its first step only, as the colocated executor runs them
    beside its decode loops), its routing recorded per step. The steps before the first that
    missed are exact and kept (`_account_chunk`); that step and the later ones are discarded
    (their KV slots are rewritten when their tokens are fed again). If the first step missed,
    the iteration runs one step as above. Each request keeps its reserved pages. A multi-step
    batch's tokens are [B, decode_steps] (`NO_TOKEN` past each request's last), else [B].
    """
    with self.counters.hosting():
      return self._run_iteration(batches)

  def _run_iteration(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    phased = ping_pong(batches, self.micro_batches, self.micro_batch_min_tokens)
    parts = [part for _, _, part in phased]
    owner = [i for _, i, _ in phased]
    buckets = []
    for part in parts:
      bucket = token_bucket(self.token_buckets, part, self.max_batch)
      if (part.model_id, bucket) not in self._warm:
        raise RuntimeError(f"bucket ({part.model_id}, {bucket}) was not compiled at start-up")
      buckets.append(bucket)

    def prepare():
      return self._prepare([(self.models[part.model_id], part, bucket, phase)
                            for (phase, _, part), bucket in zip(phased, buckets, strict=True)])

    swaps = self.wpool.pool.stats.swap_calls
    track = self.timeline_every > 0 and self.steps % self.timeline_every == 0
    self._tracking = track
    mbs = prepare()
    self._make_resident(mbs)
    events = len(self.timeline.events)
    chunk = self._chunk_steps(batches, mbs)
    kept, missed = 0, None
    if chunk:
      self.chunk_runs += 1
      tokens, marks = self._run_chunk(mbs, chunk, track)
      kept = self._account_chunk(mbs, chunk)
      if kept < chunk:  # a step missed: it and the later ones are discarded
        self.chunk_cuts += kept > 0
        self.chunk_reruns += kept == 0
        self._discard(marks[kept])
        tokens = [t if t.ndim == 1 else np.where(np.arange(t.shape[1]) < kept, t, NO_TOKEN)
                  for t in tokens]
      if not kept:  # its first step missed: the iteration runs one step instead
        mbs = prepare()
        self._make_resident(mbs)
        events = len(self.timeline.events)
    if not kept:
      tokens = self._run_micro_batches(mbs, track=track, sync=False)
      missed = self._account(mbs)
      self._chunk_backoff = missed is not None
    if missed is not None:
      self.miss_steps += 1
      self._discard(events)
      if self._load_chosen(missed):
        self.retry_runs += 1
        events = len(self.timeline.events)
        tokens = self._run_micro_batches(prepare(), track=track, sync=False)
        missed = self._account(mbs, count=False)
        if missed is not None:
          self.retry_misses += 1
          self._discard(events)
      if missed is not None:
        tokens = self._run_micro_batches(prepare(), track=track, sync=True)
        self._last_chosen.update(self._sync_chosen)
    self.expert_calls += self._tally[0]
    self.expert_members += self._tally[1]
    self.expert_splits += self._tally[2]
    self.steps += 1
    self._tracking = False
    swaps = self.wpool.pool.stats.swap_calls - swaps  # each: one put of 4 arrays, one write
    self.counters.transfers += 4 * swaps
    self._dispatched(swaps)
    out = [[] for _ in batches]
    for i, t in zip(owner, tokens, strict=True):
      out[i].append(t)
    out = [np.concatenate(t) for t in out]
    for i, b in enumerate(batches):
      if b.decode_steps is not None and not kept:  # one step of a multi-step batch
        out[i] = np.concatenate([out[i][:, None], np.full(
            (len(out[i]), self.decode_steps - 1), NO_TOKEN, out[i].dtype)], axis=1)
    self.counters.steps += max(1, kept)
    self.counters.tokens += sum(
        int((t != NO_TOKEN).sum()) if b.decode_steps is not None else b.num_sampled
        for b, t in zip(batches, out, strict=True))
    return out

  def _chunk_steps(self, batches: list[ModelBatch], mbs: list[_MicroBatch]) -> int:
    """Decode steps to run as one chunk: the most any request may generate, if a batch is
    multi-step and every multi-step micro-batch's pages are on its home KV device (`_advance`
    makes KV slots from the home page table only), unless the last step run alone missed (its
    prediction is failing: a chunk would likely be cut at its first step); else 0 (counted in
    `chunk_declined` when only the pages or that miss prevent it)."""
    if self.decode_steps == 1 or all(b.decode_steps is None for b in batches):
      return 0
    if self._chunk_backoff or any(len(mb.paged) > 1 for mb in mbs
                                  if mb.batch.decode_steps is not None):
      self.chunk_declined += 1
      return 0
    return max(k for b in batches for k in b.decode_steps or ())

  def _prepare(self, specs: list[tuple[LoadedModel, ModelBatch, int, int]], *,
                spread: bool = False) -> list[_MicroBatch]:
    """Micro-batches from (model, batch, token bucket, phase): each one's inputs packed in one
    buffer per device it needs (its home KV device, the KV devices holding its pages: every KV
    device with `spread`), all put in one call, unpacked there; its tokens embedded."""
    host, devices, packed = [], [], []
    for model, batch, bucket, _ in specs:
      with blame([model.model_id]):
        paged, sampling, next_pos = pack_batch(self.kv_pool, batch, bucket, self.max_batch)
        key = (model.model_id, bucket)
        mine = []
        for d, b in enumerate(paged):
          if spread or d == model.group or b.page_tables_LSP.any():
            arrays = step_arrays(b, sampling, next_pos)
            if self.decode_steps > 1:
              arrays |= decode_limits(batch, self.max_batch)
            if key not in self._layouts:
              self._layouts[key] = PackedLayout.like(arrays)
            host.append(pack(arrays, self._layouts[key]))
            devices.append(self.kv_devices[d])
            mine.append(d)
        packed.append((mine, paged[model.group].positions_T >= 0))
    bufs = iter(self._put(host, devices))
    mbs = []
    for index, ((model, batch, bucket, phase), (mine, valid_host)) in enumerate(
        zip(specs, packed, strict=True)):
      layout = self._layouts[model.model_id, bucket]
      on = {}
      with blame([model.model_id]):
        for d in mine:
          if d == model.group:
            on[d], sampling, next_pos, x_TD, valid_T, limits = _unpack_and_embed(
                next(bufs), model.params["embed_VD"], layout=layout)
          else:
            on[d] = _unpack(next(bufs), layout=layout)
          self._dispatched()
      mbs.append(_MicroBatch(index, phase, model, batch, on, sampling, next_pos, valid_T,
                             valid_host, x_TD, limits))
    return mbs

  def _make_resident(self, mbs: list[_MicroBatch]) -> None:
    """Before a speculative run: the experts `predict_resident` predicts for the step's MoE
    layers are prefetched (`prefetch_predicted`); then the device slot tables follow."""
    predicted = predict_resident(self.wpool.pool, self._step_layers(mbs), self._last_chosen)
    prefetch_predicted(self.wpool.prefetch, predicted)
    self._refresh_tables()

  @staticmethod
  def _step_layers(mbs: list[_MicroBatch]) -> list[tuple[str, int]]:
    """(model, layer) of every MoE layer the step's micro-batches run, once each."""
    return list(dict.fromkeys((mb.model.model_id, layer) for mb in mbs
                              for layer, moe in enumerate(mb.model.cfg.moe_layers) if moe))

  def _discard(self, events: int) -> None:
    """Marks the timeline events of a missed run (from index `events`) as discarded."""
    for event in self.timeline.events[events:]:
      event["discarded"] = True

  def _load_chosen(self, chosen: dict[tuple[str, int], np.ndarray]) -> bool:
    """After a missed run: makes resident what each layer chose in it, counted as the step's
    accesses (its misses load), if they fit each partition together; False if not (then the
    step takes the sync path). Exact up to the first layer that missed; later layers' routing
    saw a filler slot's output, so the retry may choose otherwise (and miss again)."""
    by_part = chosen_by_partition(self.wpool.pool, chosen)
    if not holds_together(self.wpool.pool, by_part):
      return False
    for requests in by_part:
      self.wpool.access_many(requests)
    self._refresh_tables()
    return True

  def _account(self, mbs: list[_MicroBatch], *, count: bool = True
               ) -> dict[tuple[str, int], np.ndarray] | None:
    """After a speculative run (tokens read): reads which experts each layer chose. A miss
    (one was not resident: rerun): returns them. Else None, the accesses counted (all hits)
    unless `count` is False (a retry: `_load_chosen` counted the step's)."""
    chosen, miss = self._chosen(mbs, {d: u[0] for d, u in self._read_used().items()})
    if miss:
      return chosen
    if count:
      for requests in chosen_by_partition(self.wpool.pool, chosen):
        self.wpool.access_many(requests)
    self._last_chosen.update(chosen)
    return None

  def _account_chunk(self, mbs: list[_MicroBatch], steps: int) -> int:
    """After a chunk (tokens read): reads which experts each layer chose in each step, and
    returns how many steps came before the first that missed (all `steps` if none did). Those
    steps' accesses are counted (all hits) as one step's each; the choices of the last step
    read (the missed one if they fit their partitions together) are the next prediction."""
    used = self._read_used()
    pool = self.wpool.pool
    for step in range(steps):
      chosen, miss = self._chosen(mbs, {d: u[step] for d, u in used.items()})
      chosen = {k: v for k, v in chosen.items() if v.size}  # sequences stopped: none
      if miss:
        if holds_together(pool, chosen_by_partition(pool, chosen)):
          self._last_chosen.update(chosen)
        return step
      for requests in chosen_by_partition(pool, chosen):
        self.wpool.access_many(requests)
      self._last_chosen.update(chosen)
    return steps

  def _read_used(self) -> dict[int, np.ndarray]:
    """One blocking read of each weights device's routing marks (`used_NRE`: per step of the
    run, layer row and expert), by device."""
    devices = sorted({d for d, t in self._tables.items() if t.rows})
    return dict(zip(devices, self._read([self._tables[d].used_NRE for d in devices]),
                    strict=True))

  def _chosen(self, mbs: list[_MicroBatch], used: dict[int, np.ndarray]
              ) -> tuple[dict[tuple[str, int], np.ndarray], bool]:
    """The experts each MoE layer of the step chose by `used` (per weights device, [rows,
    E']), and whether one of them was not resident."""
    chosen: dict[tuple[str, int], np.ndarray] = {}
    miss = False
    for key in self._step_layers(mbs):
      d = self.wpool.pool.home_device(*key)
      row = self._tables[d].rows[key]
      chosen[key] = np.flatnonzero(used[d][row])
      miss |= bool((~self._tables[d].resident_RE[row][chosen[key]]).any())
    return chosen, miss

  def _run_micro_batches(self, mbs: list[_MicroBatch], *, track: bool,
                         sync: bool) -> list[np.ndarray]:
    """Enqueues every layer of every micro-batch, then reads the sampled tokens. `sync`: read
    each layer's routing and load its experts before its expert call (the miss path).

    Raises `StepError` naming the models of the stage that raised.
    """
    self._start_run()
    tokens = self._read(self._enqueue_step(mbs, track, sync))
    return [t[:len(mb.batch.requests)] for t, mb in zip(tokens, mbs, strict=True)]

  def _start_run(self) -> None:
    """Before a run's first step: no expert chosen yet, nothing read, nothing tallied."""
    self._tally = [0, 0, 0]
    self._tokens_read = False
    self._sync_chosen: dict[tuple[str, int], np.ndarray] = {}  # what a sync run's layers chose
    for t in self._tables.values():
      if t.rows:
        t.used_NRE = _none_used(t.tables_RE, num_steps=self.decode_steps)
        self._dispatched()

  def _run_chunk(self, mbs: list[_MicroBatch], steps: int, track: bool
                 ) -> tuple[list[np.ndarray], list[int]]:
    """Enqueues `steps` decode steps of the multi-step micro-batches with no device read
    between them (the others, a prefill chunk say, run the first step only): after each
    step's sampling, `_advance` records their tokens and makes the next step's inputs on the
    home device, and each weights device keeps the step's routing marks (`used_NRE[step]`).
    Then ONE read of every micro-batch's tokens: [B, decode_steps] of a multi-step one, [B]
    of the others (their first step's). Returns them and the timeline's event count at each
    step's start.
    """
    self._start_run()
    state, marks, first = {}, [], {}  # first: a one-step micro-batch's tokens
    for mb in mbs:
      if mb.batch.decode_steps is not None:
        with blame([mb.model.model_id]):
          state[mb.index] = _chunk_start(mb.limits["steps_S"], num_steps=self.decode_steps)
          self._dispatched()
    live = list(mbs)
    for step in range(steps):
      marks.append(len(self.timeline.events))
      sampled = self._enqueue_step(live, track, sync=False, step=step)
      stepping = []
      for mb, tokens_S in zip(live, sampled, strict=True):
        if mb.index not in state:
          first[mb.index] = tokens_S
          continue
        with blame([mb.model.model_id]):
          alive_S, count_S, out_SN = state[mb.index]
          fed, next_pos, alive_S, count_S, out_SN, x_TD, valid_T = _advance(
              mb.model.params["embed_VD"], mb.paged[mb.home], mb.next_pos, tokens_S,
              alive_S, count_S, mb.limits, out_SN, self._scalar(self.kv_devices[mb.home], step),
              page_tokens=self.kv_pool.page_tokens(mb.model.model_id))
          self._dispatched()
        state[mb.index] = alive_S, count_S, out_SN
        stepping.append(dataclasses.replace(mb, paged={mb.home: fed}, next_pos=next_pos,
                                            valid_T=valid_T, x_TD=x_TD))
      live = stepping
    self._tokens_read = True
    tokens = self._read([state[mb.index][2] if mb.index in state else first[mb.index]
                         for mb in mbs])
    return [t[:len(mb.batch.requests)] for t, mb in zip(tokens, mbs, strict=True)], marks

  def _enqueue_step(self, mbs: list[_MicroBatch], track: bool, sync: bool, step: int = 0
                    ) -> list[jax.Array]:
    """Enqueues every layer of every micro-batch and its sampling; the tokens [S] on each
    micro-batch's home device (not read). `step`: the run's step (of a chunk), where the
    expert calls mark their routing."""
    depth = max(mb.model.cfg.num_layers for mb in mbs)
    for layer in range(depth):
      live = [mb for mb in mbs if layer < mb.model.cfg.num_layers]
      for mb in live:  # attention of this layer for every micro-batch ...
        with blame([mb.model.model_id]):
          self._attention(mb, layer, track)
      moe = [mb for mb in live if mb.model.cfg.moe_layers[layer]]
      self._experts(moe, layer, track, sync, step)  # ... then their experts (ping-pong)
    out = []
    for mb in mbs:  # the last layer's combine in the head's program
      with blame([mb.model.model_id]):
        out.append(stages.head_and_sample(mb.model.params, mb.x_TD,
                                          mb.paged[mb.home].cu_q_lens_S1, mb.sampling,
                                          mb.next_pos, mb.pending, cfg=mb.model.cfg))
        mb.pending = None
        self._dispatched()
    self._tokens_read = True  # the caller's read is the tokens' own
    return out

  def _track(self, track, out, mbs, layer, kind, device):
    if track:
      mbs = mbs if isinstance(mbs, list) else [mbs]
      self.timeline.track(out, step=self.steps, micro_batch=mbs[0].index,
                          model=mbs[0].model.model_id, layer=layer, kind=kind,
                          device=str(device), members=tuple(mb.index for mb in mbs),
                          models=tuple(mb.model.model_id for mb in mbs))

  def _on_swap(self, done, *, device: int, keys, prefetch: bool) -> None:
    """Puts an expert swap-in of a recorded step on the timeline ("swap": a load the miss
    path waits for; "swap_prefetch": made resident before the step), on its weights device."""
    if self._tracking:
      models = tuple(dict.fromkeys(m for m, _, _ in keys))
      self.timeline.track(done, step=self.steps, micro_batch=-1, model=models[0],
                          layer=keys[0][1], kind="swap_prefetch" if prefetch else "swap",
                          device=str(self.wpool.devices[device]), members=(-1,),
                          models=models)

  def _combine_pending(self, mb: _MicroBatch) -> None:
    if mb.pending is not None:
      mb.x_TD = stages.combine_pending(mb.x_TD, mb.pending, cfg=mb.model.cfg)
      mb.pending = None
      self._dispatched()

  def _attention(self, mb: _MicroBatch, layer: int, track: bool) -> None:
    """A layer's attention side: one program (`attention_side`, with the previous layer's
    combine) when only the home KV device holds the micro-batch's pages, else the attention of
    each KV device holding some on its pages and an LSE merge at home."""
    cfg, p = mb.model.cfg, mb.model.params["layers"][layer]
    moe = cfg.moe_layers[layer]
    home = self.kv_devices[mb.home]
    if len(mb.paged) == 1:
      result, self.kv_buffers[mb.home] = _attention_side(
          p, mb.x_TD, self.kv_buffers[mb.home], mb.paged[mb.home], self._scalar(home, layer),
          mb.pending, cfg=cfg, moe=moe, impl=self.attn_impl, message=mb.message)
      mb.pending = None
      self._dispatched()
      self._track(track, result, mb, layer, "attention_side", home)
    else:
      self._combine_pending(mb)
      q, k, v = stages.attention_inputs(p, mb.x_TD, mb.paged[mb.home].positions_T, cfg=cfg,
                                        absorbed=cfg.mla)
      self._dispatched()
      outs, lses = [], []
      for d, b in mb.paged.items():
        dev = self.kv_devices[d]
        on_home = d == mb.home  # no transfer (and no dispatch of one) to the home device
        o, lse, self.kv_buffers[d] = stages.write_and_attend_paged(
            self.kv_buffers[d], *((q, k, v) if on_home else self._put((q, k, v), dev)), b,
            self._scalar(dev, layer), cfg=cfg, impl=self.attn_impl)
        self._dispatched()
        self._track(track, o, mb, layer, "attention", dev)
        if not on_home:
          o, lse = self._put((o, lse), home)
        outs.append(o)
        lses.append(lse)
      result = _post_attention(p, mb.x_TD, outs, lses, mb.valid_T, cfg=cfg, moe=moe,
                               absorbed=cfg.mla, message=mb.message)
      self._dispatched()
      self._track(track, result, mb, layer, "merge_router", home)
    if moe:
      mb.moe = result
    else:
      (mb.x_TD,) = result

  def _experts(self, mbs: list[_MicroBatch], layer: int, track: bool, sync: bool,
               step: int) -> None:
    """The expert FFNs of a layer's micro-batches: per (phase, class, weights device) group
    (`expert_group`), calls of several members (`fuse_experts`) or one each."""
    groups: dict[tuple[int, int, int], list[_MicroBatch]] = {}
    for mb in mbs:
      key = expert_group(self.wpool.pool, mb.model.model_id, layer, mb.phase)
      groups.setdefault(key, []).append(mb)
    for (_, c, d), members in groups.items():
      with blame([mb.model.model_id for mb in members]):
        self._group(members, layer, c, d, track, sync, step)

  def _group(self, members: list[_MicroBatch], layer: int, c: int, d: int, track: bool,
             sync: bool, step: int) -> None:
    """The expert FFNs of one (class, weights device) group of a layer's micro-batches."""
    wdev = self.wpool.devices[d]
    # The transfers need no routing decision: issued first, in one call for the group.
    sent = self._put([mb.moe[2] for mb in members], wdev)
    moved = {}
    for mb, msg_TO in zip(members, sent, strict=True):
      moved[mb.index] = msg_TO
      self._track(track, msg_TO, mb, layer, "transfer_to_weights", wdev)
    chosen = None
    if sync:
      msgs = self._read([moved[mb.index] for mb in members])
      chosen = {mb.index: np.unique(mb.message.host_ids(m)[mb.valid_host]) for mb, m in
                zip(members, msgs, strict=True)}
      for mb in members:  # the union over the step's micro-batches, as `_account` reads it
        key = mb.model.model_id, layer
        self._sync_chosen[key] = np.union1d(self._sync_chosen.get(key, chosen[mb.index]),
                                            chosen[mb.index])
    calls = self._plan_calls(members, chosen, layer)
    if len(calls) > 1 and self.fuse_experts:
      self._tally[2] += 1
    for call in calls:
      if sync:
        self.wpool.access_many([(mb.model.model_id, layer, chosen[mb.index].tolist())
                                for mb in call])
        self._refresh_tables()
      self._call(call, moved, layer, c, d, track, step)

  def _plan_calls(self, members, chosen, layer) -> list[list[_MicroBatch]]:
    """`plan_expert_calls` of a group; the members' experts are known only when `chosen` is."""
    keys = [set() if chosen is None else {(mb.model.model_id, layer, int(e))
                                          for e in chosen[mb.index]} for mb in members]
    return plan_expert_calls(members, [mb.num_tokens for mb in members], keys,
                             fuse=self.fuse_experts, max_tokens=self.fused_token_buckets[-1],
                             can_hold=self.wpool.pool.can_hold)

  def _call(self, call: list[_MicroBatch], moved, layer: int, c: int, d: int,
            track: bool, step: int) -> None:
    wdev, tables = self.wpool.devices[d], self._tables[d]
    if len(call) == 1:
      self._call_one(call[0], moved[call[0].index], layer, c, d, track, step)
      return
    total = sum(mb.num_tokens for mb in call)
    fused = self.fused_token_buckets[bisect.bisect_left(self.fused_token_buckets, total)]
    if not self._warming and (c, d, tables.host_RE.shape, fused) not in self._warm_fused:
      raise RuntimeError(f"expert call (class {c}, device {d}, {fused} tokens) was not "
                         f"compiled at start-up")
    staged, offsets, offset = self._fused_zeros[c, d, fused], [], 0
    for mb in call:
      row = self._scalar(wdev, tables.rows[mb.model.model_id, layer])
      *staged, tables.used_NRE = _stage(*staged, tables.used_NRE, moved[mb.index],
                                        tables.tables_RE, row, self._scalar(wdev, offset),
                                        self._scalar(wdev, step), message=mb.message)
      offsets.append(offset)
      offset += mb.num_tokens
    y_UD = stages.routed_experts(*staged, self._identity[c, d], *self.wpool.buffers(c, d),
                                 impl=self.moe_impl)
    self._dispatched(len(call) + 1)
    self._track(track, y_UD, call, layer, "experts", wdev)
    ys = [_unstage(y_UD, moved[mb.index], self._scalar(wdev, offset), message=mb.message)
          for mb, offset in zip(call, offsets, strict=True)]
    self._dispatched(len(call))
    self._send_back(call, ys, layer, track)

  def _call_one(self, mb: _MicroBatch, msg_TO, layer: int, c: int, d: int,
                track: bool, step: int) -> None:
    """An expert call of one member: one program (`_expert_call`), no staging."""
    wdev, tables = self.wpool.devices[d], self._tables[d]
    key = (c, d, tables.host_RE.shape, (msg_TO.shape[0], mb.message))
    if not self._warming and key not in self._warm_fused:
      raise RuntimeError(f"expert call (class {c}, device {d}, one member of "
                         f"{msg_TO.shape[0]} tokens) was not compiled at start-up")
    y_TD, tables.used_NRE = _expert_call(
        tables.used_NRE, msg_TO, tables.tables_RE,
        self._scalar(wdev, tables.rows[mb.model.model_id, layer]), self._scalar(wdev, step),
        self._identity[c, d], *self.wpool.buffers(c, d), impl=self.moe_impl,
        message=mb.message)
    self._dispatched()
    self._track(track, y_TD, mb, layer, "experts", wdev)
    self._send_back([mb], [y_TD], layer, track)

  def _send_back(self, call: list[_MicroBatch], ys: list, layer: int, track: bool) -> None:
    """Puts each member's expert output on its home KV device (one call); its combine runs in
    the next attention-side program."""
    ys = self._put(ys, [self.kv_devices[mb.home] for mb in call])
    for mb, y_TD in zip(call, ys, strict=True):
      self._track(track, y_TD, mb, layer, "transfer_back", self.kv_devices[mb.home])
      x_TD, h_TD, _ = mb.moe
      mb.x_TD, mb.pending, mb.moe = x_TD, (mb.model.params["layers"][layer]["ffn"], h_TD,
                                           y_TD), None
    self._tally[0] += 1
    self._tally[1] += len(call)
