"""Device side of the weights pool: slot buffers, the host expert store, swap-in and its timing.

`ExpertStore` (host copies of every routed expert), `write_slots` (the jitted slot update),
`DeviceWeightsPool` (one buffer triple per shape class per weights device, performing the loads
its host `WeightsPool` plans) and the hidden / exposed swap timing. Invariant: a swap-in updates
the donated pool buffers in place through an index array (never a copy of the pool), and free
slots hold NaN, so a read of a slot the layer does not own shows up. Details and the timing
method: WORKSPACE.md, "The pools".
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.pools.weights_pool import (
    ExpertModelSpec,
    ShapeClass,
    SwapPlan,
    WeightsPool,
)


class ExpertStore:
  """Host copies of the routed experts of every registered model (numpy)."""

  def __init__(self):
    self._experts: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  def add_model(self, model_id: str, params: dict, cfg) -> None:
    """Copies the experts of each MoE layer of `params` to host memory.

    Args:
      model_id: the model's id.
      params: its param dict (`init_params`, a checkpoint load).
      cfg: its `ModelConfig`.
    """
    if any(m == model_id for m, _ in self._experts):
      raise ValueError(f"model {model_id!r} is already in the expert store")
    new = {}
    for layer, moe in enumerate(cfg.moe_layers):
      if not moe:
        continue
      ffn = params["layers"][layer]["ffn"]
      new[model_id, layer] = tuple(np.asarray(ffn[n]) for n in
                                   ("w_gate_EDF", "w_up_EDF", "w_down_EFD"))
    self._experts.update(new)

  def remove_model(self, model_id: str) -> None:
    for key in [k for k in self._experts if k[0] == model_id]:
      del self._experts[key]

  def gather(self, keys: Sequence[tuple[str, int, int]]):
    """Stacks of the experts `keys`: (gate [N, D, F], up [N, D, F], down [N, F, D])."""
    parts = [[self._experts[m, layer][w][e] for m, layer, e in keys] for w in range(3)]
    return tuple(np.stack(p) for p in parts)


@functools.partial(jax.jit, donate_argnames=("w_gate_SDF", "w_up_SDF", "w_down_SFD"))
def write_slots(w_gate_SDF: jax.Array, w_up_SDF: jax.Array, w_down_SFD: jax.Array,
                slots_N: jax.Array, gate_NDF: jax.Array, up_NDF: jax.Array,
                down_NFD: jax.Array):
  """Writes N experts into their slots, in place (the three buffers are donated).

  Args:
    w_gate_SDF, w_up_SDF: [S, D, F] pool buffers (donated).
    w_down_SFD: [S, F, D] pool buffer (donated).
    slots_N: int32 [N] distinct target slots; entries >= S are padding and dropped.
    gate_NDF, up_NDF: [N, D, F] expert weights.
    down_NFD: [N, F, D].

  Returns:
    (w_gate_SDF, w_up_SDF, w_down_SFD, done_N) where done_N is a copy of slots_N, a small
    output to wait on.
  """
  kw = dict(mode="drop", unique_indices=True)
  return (w_gate_SDF.at[slots_N].set(gate_NDF.astype(w_gate_SDF.dtype), **kw),
          w_up_SDF.at[slots_N].set(up_NDF.astype(w_up_SDF.dtype), **kw),
          w_down_SFD.at[slots_N].set(down_NFD.astype(w_down_SFD.dtype), **kw),
          slots_N + 0)


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class _SwapRecord:
  __slots__ = ("done", "issue", "layer_key", "need", "prefetch")

  def __init__(self, issue: float, prefetch: bool, layer_key):
    self.issue, self.prefetch, self.layer_key = issue, prefetch, layer_key
    self.need = issue if not prefetch else None
    self.done = None


class DeviceWeightsPool:
  """Slot buffers on the weights devices, kept in step with a host `WeightsPool`.

  Args:
    pool: the host-side pool (policy, budget, number of devices).
    devices: the weights devices, one per `pool.num_devices` (from config; default: the first
      `pool.num_devices` of `jax.devices()`).
    fill: value of never-written slots (NaN: a read of a slot the layer does not own poisons
      the output).
  """

  def __init__(self, pool: WeightsPool, *, devices: Sequence[jax.Device] | None = None,
               fill: float = float("nan")):
    if devices is None:
      devices = jax.devices()[: pool.num_devices]
    if len(devices) != pool.num_devices:
      raise ValueError(f"devices has {len(devices)} entries, pool.num_devices is "
                       f"{pool.num_devices}")
    self.pool = pool
    self.devices = list(devices)
    self.fill = fill
    self.store = ExpertStore()
    self.models: dict[str, tuple] = {}  # model_id -> (cfg, params without routed experts)
    self._buffers: dict[tuple[int, int], tuple[jax.Array, jax.Array, jax.Array]] = {}
    self._records: list[_SwapRecord] = []
    self._pending: dict[tuple[str, int], list[_SwapRecord]] = {}
    self._watch: queue.Queue = queue.Queue()
    # Called as on_swap(done, device=d, keys=[(model, layer, expert), ...], prefetch=bool)
    # after each slot-write call is issued (`done` is ready when it has finished).
    self.on_swap: Callable[..., None] | None = None
    self._watcher = threading.Thread(target=self._watch_loop, daemon=True)
    self._watcher.start()

  # --- models -------------------------------------------------------------------------------

  def register(self, model_id: str, cfg, params: dict, *,
               slots_per_device: int | None = None) -> dict:
    """Registers a model with the host pool, stores its experts, loads pinned ones.

    Args:
      model_id: unique name.
      cfg: its ModelConfig.
      params: its param dict; its routed experts are copied to the host store.
      slots_per_device: slots of its shape class if that class is created now.

    Returns:
      The params WITHOUT the routed experts (what stays with the model: attention,
      embeddings, norms, routers, shared experts, dense MLPs): run layers with these and the
      pool buffers.

    Raises:
      ValueError: as `WeightsPool.register_model`; the pool and store are then unchanged.
    """
    dtype = np.asarray(params["layers"][cfg.moe_layers.index(True)]["ffn"]["w_gate_EDF"]
                       ).dtype.name if any(cfg.moe_layers) else "float32"
    spec = ExpertModelSpec.from_config(model_id, cfg, dtype)
    if model_id in self.pool.models:
      raise ValueError(f"model {model_id!r} is already registered")
    self.store.add_model(model_id, params, cfg)
    try:
      c = self.pool.register_model(spec, slots_per_device=slots_per_device)
    except Exception:
      self.store.remove_model(model_id)
      raise
    self._ensure_buffers(c)
    # pin_all pinned at registration: perform those loads now.
    resident = [k for k in self.pool.resident_keys() if k[0] == model_id]
    if resident:
      self._perform(SwapPlan(loads=[(k, *self.pool.residency(k)) for k in resident]))
    pinned = strip_experts(params, cfg)
    self.models[model_id] = (cfg, pinned)
    return pinned

  def unregister(self, model_id: str) -> None:
    """Removes a model from the host pool and the store (its slots become free)."""
    self.pool.unregister_model(model_id)
    self.store.remove_model(model_id)
    del self.models[model_id]
    for key in [k for k in self._pending if k[0] == model_id]:
      for rec in self._pending.pop(key):
        rec.need = rec.issue  # its layer will never run: count it as needed at once

  def restore_lost_buffers(self) -> list[tuple[int, int]]:
    """Rebuilds every buffer triple a failed call consumed (donated, never returned): fresh
    slots, then every expert the host tables say is resident there is loaded again, so the
    device is back in step with the host pool. Returns the (class, device) pairs rebuilt."""
    lost = [key for key, bufs in self._buffers.items() if any(b.is_deleted() for b in bufs)]
    for c, d in lost:
      self._allocate(c, d)
      keys = [k for k in self.pool.resident_keys()
              if self.pool.model_class(k[0]) == c and self.pool.residency(k)[0] == d]
      self._perform(SwapPlan(loads=[(k, *self.pool.residency(k)) for k in keys]))
    return lost

  def _ensure_buffers(self, c: int) -> None:
    if (c, 0) in self._buffers:
      return
    for dev_i in range(len(self.devices)):
      self._allocate(c, dev_i)

  def _allocate(self, c: int, dev_i: int) -> None:
    """A fresh buffer triple of class `c` on weights device `dev_i`, its updates compiled."""
    cls = self.pool.classes[c]
    shape: ShapeClass = cls.shape
    dtype = jnp.dtype(shape.dtype)
    s, d, f = cls.slots_per_device, shape.d_model, shape.d_ff
    dev = self.devices[dev_i]
    # Committed to `dev` (an uncommitted buffer would compile the swap a second time).
    self._buffers[c, dev_i] = jax.device_put(
        (np.full((s, d, f), self.fill, dtype), np.full((s, d, f), self.fill, dtype),
         np.full((s, f, d), self.fill, dtype)), dev)
    # Compile the update for every bucket of N now (all-padding calls write nothing), so
    # no swap's measured time includes a compilation.
    n = 1
    while True:
      pad = jax.device_put([np.arange(s, s + n, dtype=np.int32),
                            np.zeros((n, d, f), dtype), np.zeros((n, d, f), dtype),
                            np.zeros((n, f, d), dtype)], dev)
      *new, _ = write_slots(*self._buffers[c, dev_i], *pad)
      self._buffers[c, dev_i] = tuple(new)
      if n >= s:
        break
      n *= 2

  def buffers(self, c: int, device: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(w_gate_SDF, w_up_SDF, w_down_SFD) of class `c` on weights device `device`."""
    return self._buffers[c, device]

  def layer_inputs(self, model_id: str, layer: int):
    """(slot_table_E int32 on the home device, (w_gate_SDF, w_up_SDF, w_down_SFD))."""
    c, d = self.pool.model_class(model_id), self.pool.home_device(model_id, layer)
    table = jax.device_put(self.pool.slot_table(model_id, layer), self.devices[d])
    return table, self._buffers[c, d]

  # --- swapping -----------------------------------------------------------------------------

  def access(self, model_id: str, layer: int, experts) -> SwapPlan:
    """The layer is about to run with `experts`: marks its prefetches needed, loads misses."""
    now = time.perf_counter()
    for rec in self._pending.pop((model_id, layer), []):
      rec.need = now
    plan = self.pool.access(model_id, layer, experts)
    self._perform(plan, layer_key=(model_id, layer))
    return plan

  def access_many(self, requests) -> SwapPlan:
    """`access` of several layers that share ONE kernel call on one buffer (a fused call).

    Each layer's experts are made resident with the earlier layers' experts protected, so no
    access evicts an expert another member needs (`WeightsPool.can_hold` says beforehand
    whether they all fit); the loads of all of them go to the device in one update.

    Args:
      requests: (model_id, layer, experts) of each member, in order.

    Returns:
      The merged plan (loads of every member).
    Raises:
      PoolExhaustedError: as `access`; the loads of the members before it are still performed,
        so the device buffers stay in step with the host tables.
    """
    now = time.perf_counter()
    merged = SwapPlan()
    protect: set = set()
    try:
      for model_id, layer, experts in requests:
        for rec in self._pending.pop((model_id, layer), []):
          rec.need = now
        experts = [int(e) for e in experts]
        plan = self.pool.access(model_id, layer, experts, protect=protect)
        merged.loads += plan.loads
        merged.evicted += plan.evicted
        protect |= {(model_id, layer, e) for e in experts}
    finally:
      targets = [(self.pool.model_class(k[0]), d, s) for k, d, s in merged.loads]
      assert len(set(targets)) == len(targets), "a slot loaded twice in one fused access"
      self._perform(merged)
    return merged

  def prefetch(self, model_id: str, layer: int, experts, *, protect=()) -> SwapPlan:
    """Issues the loads of predicted experts of a later layer (asynchronously)."""
    plan = self.pool.prefetch(model_id, layer, experts, protect=protect)
    self._perform(plan, layer_key=(model_id, layer))
    return plan

  def _perform(self, plan: SwapPlan, layer_key=None) -> None:
    by_buffer: dict[tuple[int, int], list] = {}
    for key, device, slot in plan.loads:
      by_buffer.setdefault((self.pool.model_class(key[0]), device), []).append((key, slot))
    for (c, d), items in by_buffer.items():
      keys = [k for k, _ in items]
      n = len(items)
      pad = _bucket(n)
      s = self.pool.classes[c].slots_per_device
      slots = np.concatenate([np.array([sl for _, sl in items], np.int32),
                              np.arange(s, s + pad - n, dtype=np.int32)])
      host = [np.concatenate([w, np.zeros((pad - n, *w.shape[1:]), w.dtype)])
              for w in self.store.gather(keys)]
      dev = self.devices[d]
      staged = jax.device_put([slots, *host], dev)  # async host -> device copy
      rec = _SwapRecord(time.perf_counter(), plan.prefetch, layer_key)
      *new, done = write_slots(*self._buffers[c, d], *staged)
      self._buffers[c, d] = tuple(new)
      self._records.append(rec)
      if plan.prefetch:
        self._pending.setdefault(layer_key, []).append(rec)
      self.pool.stats.swap_calls += 1
      self._watch.put((rec, done))
      if self.on_swap is not None:
        self.on_swap(done, device=d, keys=keys, prefetch=plan.prefetch)

  def _watch_loop(self) -> None:
    while True:
      rec, done = self._watch.get()
      try:
        done.block_until_ready()
        rec.done = time.perf_counter()
      finally:
        self._watch.task_done()

  def sync_stats(self):
    """Waits for issued swaps to finish, folds their timings into `pool.stats`; returns them.

    Only swaps whose need time is known are folded (prefetches of layers that have not run
    stay pending until they do, or until `finish_step`).
    """
    self._watch.join()
    stats = self.pool.stats
    keep = []
    for rec in self._records:
      if rec.need is None:
        keep.append(rec)
        continue
      start = rec.issue
      stats.swap_s_hidden += max(0.0, min(rec.done, rec.need) - start)
      stats.swap_s_exposed += max(0.0, rec.done - max(rec.need, start))
      if rec.prefetch:
        stats.swap_s_prefetch += rec.done - start
    self._records = keep
    return stats

  def finish_step(self) -> None:
    """Prefetches still pending when a step ends (their layer did not run) count as unused."""
    self._watch.join()
    for recs in self._pending.values():
      for rec in recs:
        self.pool.stats.swap_s_unused += rec.done - rec.issue
        self._records.remove(rec)
    self._pending.clear()
    self.sync_stats()

  def block_until_ready(self) -> None:
    for bufs in self._buffers.values():
      jax.block_until_ready(bufs)


def strip_experts(params: dict, cfg) -> dict:
  """A shallow copy of `params` without the routed experts of the MoE layers."""
  out = dict(params)
  out["layers"] = {}
  for i, layer in params["layers"].items():
    layer = dict(layer)
    if cfg.moe_layers[int(i)]:
      layer["ffn"] = {k: v for k, v in layer["ffn"].items()
                      if k not in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}
    out["layers"][i] = layer
  return out
