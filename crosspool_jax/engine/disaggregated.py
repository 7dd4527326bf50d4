"""The CrossPool executor: attention on the KV-pool devices, routed experts on the weights pool.

Per layer of a micro-batch: on the KV devices, q/k/v on the model's home KV device, then on
EVERY KV device the KV write and the attention over that device's local pages
(`paged.write_and_attend`), the partials merged exactly by their LSE on the home device, the
residual, the FFN norm, the router and (pinned with the model) the shared expert or dense MLP;
then the hidden states cross to the weights device that holds the layer's expert slots, the
experts the router chose are made resident (`DeviceWeightsPool.access`: hit or swap-in), the
expert dispatch runs there through the layer's slot table, and the result crosses back.

Pipeline: the iteration's batches are cut into micro-batches (each model's sequences split in
`micro_batches` parts, and different models' batches are micro-batches of their own); stages
are issued in ping-pong order — attention of layer l for every micro-batch, then the expert
FFN of layer l for every micro-batch — so while the host waits for one micro-batch's routing
(it must know the experts before swapping them in), the other's attention is already queued on
the KV devices, and while one micro-batch's experts run on the weights devices the next
attention runs on the KV devices. JAX dispatch is asynchronous; each device runs its queue.

Timeline: every stage records its host issue time and, from a watcher thread, the time its
output was ready; the interval is "in flight" (queued or running), not device execution time.
On 2 CPU cores the devices cannot run concurrently (PLATFORM.md), so the timeline shows what
was in flight at once, not a speedup.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.executor import LoadedModel, pack_batch, token_bucket
from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models import layers
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.paged import attention_inputs, write_and_attend
from crosspool_jax.models.sampling import sample
from crosspool_jax.pools.kv_pool import KVPool
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool
from pallas_kernels.expert_dispatch import expert_dispatch
from pallas_kernels.ragged_paged_attention import merge_attention


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
            device: str) -> None:
    if not self.enabled:
      return
    event = {"step": step, "micro_batch": micro_batch, "model": model, "layer": layer,
             "kind": kind, "device": device, "start": time.perf_counter(), "end": None}
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

    Returns {"overlap_fraction", "busy_s", "overlap_s", "transfers_concurrent_with_compute"}
    where the last counts transfers of one micro-batch in flight while a compute stage of
    another micro-batch of the same step was in flight.
    """
    self.wait()
    busy = overlapped = 0.0
    concurrent = 0
    for step in sorted({e["step"] for e in self.events}):
      evs = [e for e in self.events if e["step"] == step and e["end"] is not None]
      cuts = sorted({t for e in evs for t in (e["start"], e["end"])})
      for a, b in itertools.pairwise(cuts):
        live = {e["micro_batch"] for e in evs if e["start"] < b and e["end"] > a}
        if live:
          busy += b - a
        if len(live) >= 2:
          overlapped += b - a
      transfers = [e for e in evs if e["kind"].startswith("transfer")]
      computes = [e for e in evs if not e["kind"].startswith("transfer")]
      concurrent += sum(
          any(c["micro_batch"] != t["micro_batch"] and c["start"] < t["end"]
              and c["end"] > t["start"] for c in computes) for t in transfers)
    return {"overlap_fraction": overlapped / busy if busy else 0.0, "busy_s": busy,
            "overlap_s": overlapped, "transfers_concurrent_with_compute": concurrent}


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _post_attention(p, x_TD, outs_MTNH, lses_MTN, *, cfg: ModelConfig, layer: int):
  """Merge + output projection + residual; then the FFN norm and the router (MoE layer) or the
  whole dense MLP (dense layer, pinned with the model).

  Returns (x_TD, h_TD, ids_TK, weights_TK) for a MoE layer, (x_TD,) for a dense one.
  """
  o_TNH, _ = merge_attention(outs_MTNH, lses_MTN)
  x_TD = x_TD + layers.attention_out(p["attn"], o_TNH.astype(x_TD.dtype))
  h_TD = layers.rms_norm(x_TD, p["ffn_norm_D"], cfg.rms_eps)
  if not cfg.moe_layers[layer]:
    return (x_TD + layers.ffn_block(p["ffn"], h_TD, cfg, layer),)
  ids_TK, weights_TK = layers.route(p["ffn"]["w_router_DE"], h_TD, cfg)
  return x_TD, h_TD, ids_TK, weights_TK


@functools.partial(jax.jit, static_argnames=("impl",))
def _experts(h_TD, ids_TK, weights_TK, valid_T, slot_table_E, w_gate_SDF, w_up_SDF, w_down_SFD,
             *, impl):
  return expert_dispatch(h_TD, ids_TK, weights_TK, slot_table_E, w_gate_SDF, w_up_SDF,
                         w_down_SFD, valid_T=valid_T, impl=impl)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _combine(p_ffn, x_TD, h_TD, y_TD, *, cfg: ModelConfig):
  """x + (routed experts + shared expert), as `layers.moe_block` adds them."""
  return x_TD + layers.add_shared_expert(p_ffn, h_TD, y_TD, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head_and_sample(params, x_TD, cu_q_lens_S1, sampling, next_positions_S, *, cfg):
  last_S = jnp.maximum(cu_q_lens_S1[1:] - 1, 0)
  logits_SV = layers.lm_head(params, x_TD[last_S], cfg)
  return sample(logits_SV, next_positions_S, **sampling)


@dataclasses.dataclass
class _MicroBatch:
  index: int
  model: LoadedModel
  batch: ModelBatch
  paged: list  # PagedBatch per KV device, on that device
  sampling: dict
  next_pos: jax.Array
  valid_T: jax.Array
  x_TD: jax.Array
  moe: tuple | None = None  # (x_TD after attention, h_TD, ids_TK, weights_TK) between stages


class DisaggregatedExecutor:
  """Runs model batches with the CrossPool memory organisation (see the module docstring).

  Args:
    models: registered models; params WITHOUT routed experts, on their home KV device
      (`kv_devices[model.group]`), where their embedding, q/k/v, LSE merge, router, shared
      expert / dense MLP, head and sampling run.
    kv_pool: the one KV pool over all KV devices (shared by every model).
    kv_buffers: its page buffer on each KV device (updated in place).
    wpool: the weights pool holding every model's routed experts on the weights devices.
    token_buckets: padded token counts per micro-batch.
    max_batch: sequences per micro-batch.
    micro_batches: parts each model batch is cut into (1 = no pipeline, the ablation).
    attn_impl, moe_impl: kernel implementations.
    timeline: record the per-stage timeline.
  """

  def __init__(self, models: dict[str, LoadedModel], kv_pool: KVPool,
               kv_buffers: list[jax.Array], wpool: DeviceWeightsPool, *,
               token_buckets: tuple[int, ...], max_batch: int, micro_batches: int = 2,
               attn_impl: str | None = None, moe_impl: str | None = None,
               timeline: bool = True):
    if not 1 <= micro_batches <= max_batch:
      raise ValueError(f"micro_batches must be in [1, max_batch={max_batch}] (a micro-batch "
                       f"needs at least one request), got {micro_batches}")
    if len(kv_buffers) != kv_pool.num_devices:
      raise ValueError(f"{len(kv_buffers)} KV buffers for {kv_pool.num_devices} KV devices")
    self.models = models
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
    self.steps = 0
    self._warm: set[tuple[str, int]] = set()

  @property
  def compile_count(self) -> int:
    return len(self._warm)

  def compile_all(self, log=None) -> int:
    """Warms every (model, token bucket) with an all-padding micro-batch (compiles each stage)."""
    for model_id, model in self.models.items():
      for bucket in self.token_buckets:
        empty = ModelBatch(model_id, [], [])
        self._run_micro_batches([self._prepare(0, model, empty, bucket)], track=False)
        self._warm.add((model_id, bucket))
        if log:
          log(f"compiled {model_id} tokens={bucket}")
    return self.compile_count

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
      mbs.append(self._prepare(j, self.models[part.model_id], part, bucket))
    tokens = self._run_micro_batches(mbs, track=True)
    self.steps += 1
    out = [[] for _ in batches]
    for i, t in zip(owner, tokens, strict=True):
      out[i].append(t)
    return [np.concatenate(t) for t in out]

  def _home(self, mb: _MicroBatch):
    """(the model's home KV device, its copy of the micro-batch's inputs)."""
    return self.kv_devices[mb.model.group], mb.paged[mb.model.group]

  def _prepare(self, index: int, model: LoadedModel, batch: ModelBatch,
               bucket: int) -> _MicroBatch:
    paged, sampling, next_pos = pack_batch(self.kv_pool, batch, bucket, self.max_batch)
    paged = [jax.device_put(b, d) for b, d in zip(paged, self.kv_devices, strict=True)]
    home = paged[model.group]
    sampling, next_pos = jax.device_put((sampling, next_pos), self.kv_devices[model.group])
    x_TD = model.params["embed_VD"][home.tokens_T]
    return _MicroBatch(index, model, batch, paged, sampling, next_pos, home.positions_T >= 0,
                       x_TD)

  def _run_micro_batches(self, mbs: list[_MicroBatch], *, track: bool) -> list[np.ndarray]:
    depth = max(mb.model.cfg.num_layers for mb in mbs)
    for layer in range(depth):
      live = [mb for mb in mbs if layer < mb.model.cfg.num_layers]
      for mb in live:  # attention of this layer for every micro-batch ...
        self._attention(mb, layer, track)
      for mb in live:  # ... then their expert FFNs (ping-pong between the pools)
        self._ffn(mb, layer, track)
    tokens = [_head_and_sample(mb.model.params, mb.x_TD, self._home(mb)[1].cu_q_lens_S1,
                               mb.sampling, mb.next_pos, cfg=mb.model.cfg) for mb in mbs]
    return [np.asarray(t)[:len(mb.batch.requests)] for t, mb in zip(tokens, mbs, strict=True)]

  def _track(self, track, out, mb, layer, kind, device):
    if track:
      self.timeline.track(out, step=self.steps, micro_batch=mb.index, model=mb.model.model_id,
                          layer=layer, kind=kind, device=str(device))

  def _attention(self, mb: _MicroBatch, layer: int, track: bool) -> None:
    cfg, p = mb.model.cfg, mb.model.params["layers"][layer]
    home, home_batch = self._home(mb)
    q, k, v = attention_inputs(p, mb.x_TD, home_batch.positions_T, cfg=cfg)
    outs, lses = [], []
    for d, (b, dev) in enumerate(zip(mb.paged, self.kv_devices, strict=True)):
      o, lse, self.kv_buffers[d] = write_and_attend(
          self.kv_buffers[d], *jax.device_put((q, k, v), dev), b.slot_mapping_LT[layer],
          b.page_tables_LSP[layer], b.cu_q_lens_S1, b.kv_lens_S, b.num_seqs_1, cfg=cfg,
          impl=self.attn_impl)
      self._track(track, o, mb, layer, "attention", dev)
      outs.append(jax.device_put(o, home))
      lses.append(jax.device_put(lse, home))
    result = _post_attention(p, mb.x_TD, jnp.stack(outs), jnp.stack(lses), cfg=cfg, layer=layer)
    self._track(track, result, mb, layer, "merge_router", home)
    if cfg.moe_layers[layer]:
      mb.moe = result
    else:
      (mb.x_TD,) = result

  def _ffn(self, mb: _MicroBatch, layer: int, track: bool) -> None:
    cfg = mb.model.cfg
    if not cfg.moe_layers[layer]:
      return
    model_id = mb.model.model_id
    x_TD, h_TD, ids_TK, weights_TK = mb.moe
    valid = np.asarray(mb.valid_T)
    experts = np.unique(np.asarray(ids_TK)[valid]) if valid.any() else np.zeros(0, np.int32)
    self.wpool.access(model_id, layer, experts.tolist())
    slot_table_E, buffers = self.wpool.layer_inputs(model_id, layer)
    wdev = slot_table_E.devices().pop()
    moved = jax.device_put((h_TD, ids_TK, weights_TK, mb.valid_T), wdev)
    self._track(track, moved, mb, layer, "transfer_to_weights", wdev)
    y_TD = _experts(*moved, slot_table_E, *buffers, impl=self.moe_impl)
    self._track(track, y_TD, mb, layer, "experts", wdev)
    home = self._home(mb)[0]
    y_TD = jax.device_put(y_TD, home)
    self._track(track, y_TD, mb, layer, "transfer_back", home)
    mb.x_TD = _combine(mb.model.params["layers"][layer]["ffn"], x_TD, h_TD, y_TD, cfg=cfg)
    mb.moe = None
