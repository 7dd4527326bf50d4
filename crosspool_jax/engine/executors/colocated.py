"""The colocated executor: each model's whole step (attention + MoE + sampling) on its group.

Shapes are bucketed: per model, one executable per token bucket (sequences padded to
`max_batch`, page tables to the model's max pages), compiled at start-up and kept in a dict,
so a batch that fits no bucket fails loudly instead of recompiling. All host inputs of a step
are packed into preallocated-size numpy arrays and transferred once.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.executors.api import HostCounters, LoadedModel, blame
from crosspool_jax.engine.executors.batching import pack_batch, stack_params_padded, token_bucket
from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models.paged import PagedBatch, forward_paged
from crosspool_jax.models.sampling import sample
from crosspool_jax.pools.kv_buffers import allocate_kv_buffer
from crosspool_jax.pools.kv_pool import KVPool


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "moe_impl"),
                   donate_argnames=("pool_PE",))
def _step(params, pool_PE, batch: PagedBatch, sampling, next_positions_S, *, cfg, attn_impl,
          moe_impl):
  """forward_paged + on-device sampling of each sequence's next token."""
  logits_SV, pool_PE = forward_paged(params, pool_PE, batch, cfg=cfg, attn_impl=attn_impl,
                                     moe_impl=moe_impl)
  return sample(logits_SV, next_positions_S, **sampling), pool_PE


class ColocatedExecutor:
  """Runs model batches on their group's device against the group's KV buffer.

  Args:
    models: registered models by id.
    pools: the KV pool of each model (shared by the models of one group).
    buffers: the KV buffer of each group, on that group's device (updated in place).
    token_buckets: padded token counts per model step, ascending.
    max_batch: sequences per model step.
    attn_impl, moe_impl: kernel implementations.
  """

  def __init__(self, models: dict[str, LoadedModel], pools: dict[str, KVPool],
               buffers: dict[int, jax.Array], *, token_buckets: tuple[int, ...], max_batch: int,
               attn_impl: str | None = None, moe_impl: str | None = None):
    if list(token_buckets) != sorted(set(token_buckets)) or token_buckets[0] < 1:
      raise ValueError(f"token_buckets must be ascending positive ints, got {token_buckets}")
    self.models = dict(models)
    self.pools = dict(pools)
    self.buffers = dict(buffers)
    self._devices = {g: b.devices().pop() for g, b in buffers.items()}  # outlives a lost buffer
    self.token_buckets = tuple(token_buckets)
    self.max_batch = max_batch
    self.attn_impl = attn_impl
    self.moe_impl = moe_impl
    self._executables: dict[tuple[str, int], jax.stages.Compiled] = {}
    self.counters = HostCounters()
    self._read_s = 0.0  # of the step being run: time blocked reading tokens

  @property
  def compile_count(self) -> int:
    return len(self._executables)

  def compile_all(self, log=None) -> int:
    """Compiles every (model, token bucket); returns the number of executables."""
    for model_id in self.models:
      self._compile_model(model_id, log)
    return self.compile_count

  def _compile_model(self, model_id: str, log=None) -> None:
    model = self.models[model_id]
    for bucket in self.token_buckets:
      args = self._abstract_args(model, bucket)
      self._executables[model_id, bucket] = _step.lower(
          model.params, self.buffers[model.group], *args, cfg=model.cfg,
          attn_impl=self.attn_impl, moe_impl=self.moe_impl).compile()
      if log:
        log(f"compiled {model_id} tokens={bucket}")

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
      del self._executables[key]

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

  def _abstract_args(self, model: LoadedModel, bucket: int):
    pool = self.pools[model.model_id]
    width = pool.tables(model.model_id, []).shape[2]
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    s, layers = self.max_batch, model.cfg.num_layers
    batch = PagedBatch(tokens_T=i32((bucket,)), positions_T=i32((bucket,)),
                       cu_q_lens_S1=i32((s + 1,)), kv_lens_S=i32((s,)), num_seqs_1=i32((1,)),
                       page_tables_LSP=i32((layers, s, width)),
                       slot_mapping_LT=i32((layers, bucket)))
    sampling = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                for k, v in stack_params_padded([], s).items()}
    return batch, sampling, i32((s,))

  def run(self, batch: ModelBatch) -> np.ndarray:
    """Feeds the batch; returns the token sampled after each request's fed tokens."""
    model = self.models[batch.model_id]
    bucket = token_bucket(self.token_buckets, batch, self.max_batch)
    exe = self._executables.get((batch.model_id, bucket))
    if exe is None:
      raise RuntimeError(f"bucket ({batch.model_id}, {bucket}) was not compiled at start-up")
    paged, sampling, next_pos = pack_batch(self.pools[model.model_id], batch, bucket,
                                           self.max_batch)
    device = self._devices[model.group]
    inputs = (paged[0], sampling, next_pos)
    paged, sampling, next_pos = jax.device_put(inputs, device)
    tokens_S, self.buffers[model.group] = exe(model.params, self.buffers[model.group], paged,
                                              sampling, next_pos)
    self.counters.transfers += len(jax.tree.leaves(inputs))
    self.counters.dispatches += 1
    self.counters.blocking_reads += 1
    read = time.perf_counter()
    tokens = jax.device_get(tokens_S)[:len(batch.requests)]
    self._read_s += time.perf_counter() - read
    return tokens

  def run_many(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    """`run` of each batch in turn (one model step after the other).

    Raises:
      StepError: naming the model whose batch raised (the batches before it have run).
    """
    start, self._read_s = time.perf_counter(), 0.0
    out = []
    for b in batches:
      with blame([b.model_id]):
        out.append(self.run(b))
    self.counters.steps += 1
    self.counters.tokens += sum(b.num_sampled for b in batches)
    self.counters.host_s += time.perf_counter() - start - self._read_s
    return out
