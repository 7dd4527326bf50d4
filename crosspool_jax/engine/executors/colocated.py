"""The colocated executor: each model's whole step (attention + MoE + sampling) on its group.

Shapes are bucketed: per model, one executable per token bucket (sequences padded to
`max_batch`, page tables to the model's max pages), compiled at start-up and kept in a dict,
so a batch that fits no bucket fails loudly instead of recompiling. A step's host inputs are
packed into ONE int32 buffer (`batching.pack`), put on the device once and unpacked inside the
jit. With `decode_steps` > 1, a decode-only batch whose requests may generate several tokens
(`ModelBatch.decode_steps`) runs that many decode steps in one dispatch (`_decode_loop`, a
`lax.while_loop`: forward, KV write, sampling on device) with one read of all its tokens.
`timeline` (every `timeline_every`th step) records each model program's interval, from its
dispatch to its tokens being ready, in the CrossPool `Timeline`'s event format.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.executors.api import HostCounters, LoadedModel, blame
from crosspool_jax.engine.executors.batching import (
  SAMPLING_KEYS,
  PackedLayout,
  decode_arrays,
  decode_slots,
  decode_stopped,
  pack,
  pack_batch,
  stack_params_padded,
  step_arrays,
  step_inputs,
  token_bucket,
  unpack,
)
from crosspool_jax.engine.executors.crosspool import Timeline
from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models.paged import PagedBatch, forward_paged
from crosspool_jax.models.sampling import NO_TOKEN, sample
from crosspool_jax.pools.kv_buffers import allocate_kv_buffer
from crosspool_jax.pools.kv_pool import KVPool


@functools.partial(jax.jit, static_argnames=("layout", "cfg", "attn_impl", "moe_impl"),
                   donate_argnames=("pool_PE",))
def _step(params, pool_PE, packed_N, *, layout: PackedLayout, cfg, attn_impl, moe_impl):
  """Unpacks the step's inputs; forward_paged + on-device sampling of each next token."""
  batch, sampling, next_positions_S = step_inputs(unpack(packed_N, layout))
  logits_SV, pool_PE = forward_paged(params, pool_PE, batch, cfg=cfg, attn_impl=attn_impl,
                                     moe_impl=moe_impl)
  return sample(logits_SV, next_positions_S, **sampling), pool_PE


@functools.partial(jax.jit, static_argnames=("layout", "num_steps", "page_tokens", "cfg",
                                             "attn_impl", "moe_impl"),
                   donate_argnames=("pool_PE",))
def _decode_loop(params, pool_PE, packed_N, *, layout: PackedLayout, num_steps: int,
                 page_tokens: int, cfg, attn_impl, moe_impl):
  """Up to `num_steps` decode steps of one batch (`batching.decode_arrays`, packed).

  Each iteration feeds every live sequence its last token (KV written at the slot its page
  table gives), samples the next and stops a sequence on a stop id, an `INVALID_TOKEN` or
  once it generated its `steps_S`; the loop ends when none is live. Returns (tokens [S, N],
  `NO_TOKEN` past each sequence's last, pool).
  """
  a = unpack(packed_N, layout)
  sampling = {k: a[k] for k in SAMPLING_KEYS}
  tables_LSP, num_seqs_1, steps_S, stops_S4 = (a["page_tables_LSP"], a["num_seqs_1"],
                                               a["steps_S"], a["stop_ids_S4"])
  s = steps_S.shape[0]
  rows_S = jnp.arange(s)
  cu_q_lens_S1 = jnp.minimum(jnp.arange(s + 1), num_seqs_1[0]).astype(jnp.int32)

  def live(carry):
    i, alive_S = carry[0], carry[3]
    return (i < num_steps) & alive_S.any()

  def step(carry):
    i, pool_PE, tokens_S, alive_S, pos_S, count_S, out_SN = carry
    batch = PagedBatch(tokens_T=tokens_S, positions_T=jnp.where(alive_S, pos_S, -1),
                       cu_q_lens_S1=cu_q_lens_S1,
                       kv_lens_S=jnp.where(rows_S < num_seqs_1[0], pos_S + alive_S, 0),
                       num_seqs_1=num_seqs_1, page_tables_LSP=tables_LSP,
                       slot_mapping_LT=decode_slots(tables_LSP, pos_S, alive_S, page_tokens))
    logits_SV, pool_PE = forward_paged(params, pool_PE, batch, cfg=cfg, attn_impl=attn_impl,
                                       moe_impl=moe_impl)
    next_S = sample(logits_SV, pos_S + 1, **sampling)
    out_SN = out_SN.at[:, i].set(jnp.where(alive_S, next_S, NO_TOKEN))
    count_S = count_S + alive_S
    tokens_S = jnp.where(alive_S, next_S, tokens_S)
    pos_S = pos_S + alive_S
    stopped_S = decode_stopped(next_S, count_S, steps_S, stops_S4)
    return i + 1, pool_PE, tokens_S, alive_S & ~stopped_S, pos_S, count_S, out_SN

  alive_S = steps_S > 0
  carry = (jnp.int32(0), pool_PE, a["tokens_S"], alive_S,
           jnp.where(alive_S, a["positions_S"], 0), jnp.zeros(s, jnp.int32),
           jnp.full((s, num_steps), NO_TOKEN, jnp.int32))
  carry = jax.lax.while_loop(live, step, carry)
  return carry[6], carry[1]


class ColocatedExecutor:
  """Runs model batches on their group's device against the group's KV buffer.

  Args:
    models: registered models by id.
    pools: the KV pool of each model (shared by the models of one group).
    buffers: the KV buffer of each group, on that group's device (updated in place).
    token_buckets: padded token counts per model step, ascending.
    max_batch: sequences per model step.
    attn_impl, moe_impl: kernel implementations.
    decode_steps: decode steps of one multi-step dispatch (1: none; one more executable per
      model otherwise).
    timeline_every: record every Nth step's model programs in `timeline` (0: none): kind
      "model_step" (or "decode_loop"), micro_batch = the batch's index in the step.
  """

  def __init__(self, models: dict[str, LoadedModel], pools: dict[str, KVPool],
               buffers: dict[int, jax.Array], *, token_buckets: tuple[int, ...], max_batch: int,
               attn_impl: str | None = None, moe_impl: str | None = None,
               decode_steps: int = 1, timeline_every: int = 0):
    if list(token_buckets) != sorted(set(token_buckets)) or token_buckets[0] < 1:
      raise ValueError(f"token_buckets must be ascending positive ints, got {token_buckets}")
    if decode_steps < 1:
      raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
    self.decode_steps = decode_steps
    self.models = dict(models)
    self.pools = dict(pools)
    self.buffers = dict(buffers)
    self._devices = {g: b.devices().pop() for g, b in buffers.items()}  # outlives a lost buffer
    self.token_buckets = tuple(token_buckets)
    self.max_batch = max_batch
    self.attn_impl = attn_impl
    self.moe_impl = moe_impl
    # (model, token bucket) and (model, "decode") -> executable, with its input layout
    self._executables: dict[tuple[str, int | str], jax.stages.Compiled] = {}
    self._layouts: dict[tuple[str, int | str], PackedLayout] = {}
    self.counters = HostCounters()
    if timeline_every < 0:
      raise ValueError(f"timeline_every must be >= 0, got {timeline_every}")
    self.timeline = Timeline(timeline_every > 0, watchers=0)  # stamped here: no threads
    self.timeline_every = timeline_every
    self.steps = 0  # run_many calls

  @property
  def compile_count(self) -> int:
    return len(self._executables)

  def compile_all(self, log=None) -> int:
    """Compiles and warms every (model, token bucket) (`_warm`); returns the number of
    executables."""
    for model_id in self.models:
      self._compile_model(model_id, log)
    return self.compile_count

  def _compile_model(self, model_id: str, log=None) -> None:
    model = self.models[model_id]
    buffer = self.buffers[model.group]
    impls = {"cfg": model.cfg, "attn_impl": self.attn_impl, "moe_impl": self.moe_impl}
    for bucket in self.token_buckets:
      layout = self._layouts[model_id, bucket] = self._step_layout(model, bucket)
      self._executables[model_id, bucket] = _step.lower(
          model.params, buffer, _abstract(layout), layout=layout, **impls).compile()
      paged, sampling, next_pos = pack_batch(self.pools[model_id], ModelBatch(model_id, [], []),
                                             bucket, self.max_batch)
      self._warm(model, (model_id, bucket), step_arrays(paged[0], sampling, next_pos))
      if log:
        log(f"compiled {model_id} tokens={bucket}")
    if self.decode_steps > 1:
      layout = self._layouts[model_id, "decode"] = self._decode_layout(model)
      self._executables[model_id, "decode"] = _decode_loop.lower(
          model.params, buffer, _abstract(layout), layout=layout, num_steps=self.decode_steps,
          page_tokens=self.pools[model_id].page_tokens(model_id), **impls).compile()
      self._warm(model, (model_id, "decode"), decode_arrays(
          self.pools[model_id], ModelBatch(model_id, [], [], decode_steps=[]), self.max_batch))
      if log:
        log(f"compiled {model_id} decode_steps={self.decode_steps}")

  def _warm(self, model: LoadedModel, key: tuple, arrays) -> None:
    """Runs an executable once on a batch of no sequence (every token padding: nothing is
    written but the null page). An executable's first run on XLA:CPU costs ~20 ms more than
    the next ones (fitted by the simulator's calibration on the CPU demo); unwarmed, that fell
    on the first request of each shape, as a TBT spike."""
    packed_N = jax.device_put(pack(arrays, self._layouts[key]), self._devices[model.group])
    tokens, self.buffers[model.group] = self._executables[key](
        model.params, self.buffers[model.group], packed_N)
    jax.block_until_ready(tokens)

  def add_model(self, model: LoadedModel, pool: KVPool, buffer: jax.Array | None = None,
                log=None) -> None:
    """Serves a model registered while running: compiles its buckets (the others' requests
    are not touched). `buffer`: its group's KV buffer if the group is new."""
    if buffer is not None:
      self.buffers[model.group] = buffer
      self._devices[model.group] = buffer.devices().pop()
    self.models[model.model_id] = model
    self.pools[model.model_id] = pool
    self._compile_model(model.model_id, log)

  def remove_model(self, model_id: str) -> None:
    """Drops a model's executables (its group's buffer stays with the group)."""
    del self.models[model_id], self.pools[model_id]
    for key in [k for k in self._executables if k[0] == model_id]:
      del self._executables[key], self._layouts[key]

  def restore_lost_buffers(self) -> list[KVPool]:
    """Re-allocates the KV buffers a failed step consumed (donated, never returned); returns
    the pools whose pages were lost with them (their requests must be recomputed)."""
    lost = []
    for model_id, model in self.models.items():
      buf = self.buffers[model.group]
      if buf.is_deleted():
        pool = self.pools[model_id]
        self.buffers[model.group] = allocate_kv_buffer(pool, self._devices[model.group],
                                                       dtype=buf.dtype)
        lost.append(pool)
    return lost

  def _step_layout(self, model: LoadedModel, bucket: int) -> PackedLayout:
    """The packed layout of a one-step batch of `bucket` tokens."""
    pool = self.pools[model.model_id]
    width = pool.tables(model.model_id, []).shape[2]
    s, layers = self.max_batch, model.cfg.num_layers
    i32 = functools.partial(np.zeros, dtype=np.int32)
    batch = PagedBatch(tokens_T=i32(bucket), positions_T=i32(bucket), cu_q_lens_S1=i32(s + 1),
                       kv_lens_S=i32(s), num_seqs_1=i32(1),
                       page_tables_LSP=i32((layers, s, width)),
                       slot_mapping_LT=i32((layers, bucket)))
    return PackedLayout.like(step_arrays(batch, stack_params_padded([], s), i32(s)))

  def _decode_layout(self, model: LoadedModel) -> PackedLayout:
    """The packed layout of a multi-step decode batch."""
    empty = ModelBatch(model.model_id, [], [], decode_steps=[])
    return PackedLayout.like(decode_arrays(self.pools[model.model_id], empty, self.max_batch))

  def run(self, batch: ModelBatch, *, index: int | None = None) -> np.ndarray:
    """Feeds the batch; returns the token sampled after each request's fed tokens, or for a
    multi-step batch (`batch.decode_steps`) each request's tokens [B, decode_steps]
    (`NO_TOKEN` past its last). `index`: its place in the step, to record it in `timeline`."""
    model = self.models[batch.model_id]
    pool = self.pools[model.model_id]
    if batch.decode_steps is not None:
      key = (batch.model_id, "decode")
      if key not in self._executables:
        raise RuntimeError(f"model {batch.model_id!r} has no multi-step executable "
                           f"(decode_steps={self.decode_steps})")
      arrays = decode_arrays(pool, batch, self.max_batch)
    else:
      bucket = token_bucket(self.token_buckets, batch, self.max_batch)
      key = (batch.model_id, bucket)
      if key not in self._executables:
        raise RuntimeError(f"bucket ({batch.model_id}, {bucket}) was not compiled at start-up")
      paged, sampling, next_pos = pack_batch(pool, batch, bucket, self.max_batch)
      arrays = step_arrays(paged[0], sampling, next_pos)
    packed_N = jax.device_put(pack(arrays, self._layouts[key]), self._devices[model.group])
    self.counters.transfers += 1
    issued = time.perf_counter()
    tokens, self.buffers[model.group] = self._executables[key](
        model.params, self.buffers[model.group], packed_N)
    self.counters.dispatches += 1
    self.counters.blocking_reads += 1
    with self.counters.blocked():
      if index is not None:  # a recorded step: the program's end is when its tokens are ready
        jax.block_until_ready(tokens)
        self.timeline.record(start=issued, end=time.perf_counter(), step=self.steps,
                             micro_batch=index, model=batch.model_id, layer=-1,
                             kind="model_step" if batch.decode_steps is None else "decode_loop",
                             device=str(self._devices[model.group]))
      tokens = jax.device_get(tokens)
    return tokens[:len(batch.requests)]

  def run_many(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    """`run` of each batch in turn (one model step after the other).

    Counts one step per call, or for multi-step batches the most decode steps one of them
    ran (each is a step of the model loop), and the tokens generated.

    Raises:
      StepError: naming the model whose batch raised (the batches before it have run).
    """
    with self.counters.hosting():
      return self._run_iteration(batches)

  def _run_iteration(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    out, steps, tokens = [], 1, 0
    track = self.timeline.enabled and self.steps % self.timeline_every == 0
    for i, b in enumerate(batches):
      with blame([b.model_id]):
        out.append(self.run(b, index=i if track else None))
      if b.decode_steps is None:
        tokens += b.num_sampled
      else:
        generated_B = (out[-1] != NO_TOKEN).sum(axis=1)
        tokens += int(generated_B.sum())
        steps = max(steps, int(generated_B.max(initial=1)))
    self.steps += 1
    self.counters.steps += steps
    self.counters.tokens += tokens
    return out


def _abstract(layout: PackedLayout) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((layout.size,), jnp.int32)
