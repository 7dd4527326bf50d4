"""The colocated executor: each model's whole step (attention + MoE + sampling) on its group.

Shapes are bucketed: per model, one executable per token bucket (sequences padded to
`max_batch`, page tables to the model's max pages), compiled at start-up and kept in a dict,
so a batch that fits no bucket fails loudly instead of recompiling. All host inputs of a step
are packed into preallocated-size numpy arrays and transferred once.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.paged import PagedBatch, forward_paged
from crosspool_jax.models.sampling import SamplingParams, sample, stack_params
from crosspool_jax.pools.kv_buffers import allocate_kv_buffer
from crosspool_jax.pools.kv_pool import KVPool


class StepError(RuntimeError):
  """A model's part of a step raised; `model_ids` names the models whose work it was."""

  def __init__(self, model_ids, cause: BaseException):
    self.model_ids = frozenset(model_ids)
    self.cause = cause
    super().__init__(f"step of model(s) {sorted(self.model_ids)} failed: "
                     f"{type(cause).__name__}: {cause}")


@contextlib.contextmanager
def blame(model_ids):
  """Turns an exception raised inside into a `StepError` naming `model_ids`."""
  try:
    yield
  except StepError:
    raise
  except Exception as e:
    raise StepError(model_ids, e) from e


@dataclasses.dataclass
class LoadedModel:
  """A registered model: config, params (on its group's device) and KV group."""

  model_id: str
  cfg: ModelConfig
  params: dict
  group: int


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
    paged, sampling, next_pos = jax.device_put((paged[0], sampling, next_pos), device)
    tokens_S, self.buffers[model.group] = exe(model.params, self.buffers[model.group], paged,
                                              sampling, next_pos)
    return np.asarray(tokens_S)[:len(batch.requests)]

  def run_many(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    """`run` of each batch in turn (one model step after the other).

    Raises:
      StepError: naming the model whose batch raised (the batches before it have run).
    """
    out = []
    for b in batches:
      with blame([b.model_id]):
        out.append(self.run(b))
    return out


def token_bucket(buckets: tuple[int, ...], batch: ModelBatch, max_batch: int) -> int:
  """The smallest compiled token count that holds the batch; RuntimeError if none does."""
  b = bisect.bisect_left(buckets, batch.num_tokens)
  if b == len(buckets) or len(batch.requests) > max_batch:
    raise RuntimeError(f"no compiled bucket for {batch.num_tokens} tokens / "
                       f"{len(batch.requests)} sequences (buckets {buckets}, "
                       f"max_batch {max_batch})")
  return buckets[b]


def pack_batch(pool: KVPool, batch: ModelBatch, bucket: int, max_batch: int):
  """Host arrays of one model step: a PagedBatch per KV device of `pool`, sampling, positions.

  Tokens are padded to `bucket`, sequences to `max_batch`, page tables to the model's max
  pages; each device's batch holds its local page tables and slot mapping (pages elsewhere
  read as 0 and are skipped). Returns ([PagedBatch per device], sampling arrays [S],
  next positions [S] (where each sampled token goes)).
  """
  model_id = batch.model_id
  s = max_batch
  page_tokens = pool.page_tokens(model_id)
  lens = np.asarray(batch.num_new, np.int32)
  n = lens.size
  cu = np.zeros(s + 1, np.int32)
  cu[1:n + 1] = np.cumsum(lens)
  cu[n + 1:] = cu[n]
  seq_of_token = np.repeat(np.arange(n), lens)
  starts = np.asarray([r.num_cached for r in batch.requests], np.int32)
  positions = np.full(bucket, -1, np.int32)
  positions[:cu[n]] = starts[seq_of_token] + (np.arange(cu[n]) - cu[seq_of_token])
  tokens = np.zeros(bucket, np.int32)
  if n:
    tokens[:cu[n]] = np.concatenate([r.pending_ids(k) for r, k in
                                     zip(batch.requests, batch.num_new, strict=True)])
  kv_lens = np.zeros(s, np.int32)
  kv_lens[:n] = starts + lens
  tables = pool.tables(model_id, [r.request_id for r in batch.requests])
  batch_index = np.zeros(bucket, np.int64)
  batch_index[:cu[n]] = seq_of_token
  per_device = []
  for d in range(pool.num_devices):
    local = np.zeros((tables.shape[0], s, tables.shape[2]), np.int32)
    local[:, :n] = pool.local_tables(tables, d)
    slots = pool.slot_mapping(tables, batch_index, positions, page_tokens, device=d)
    per_device.append(PagedBatch(tokens_T=tokens, positions_T=positions, cu_q_lens_S1=cu,
                                 kv_lens_S=kv_lens, num_seqs_1=np.asarray([n], np.int32),
                                 page_tables_LSP=local, slot_mapping_LT=slots))
  sampling = stack_params_padded([r.sampling for r in batch.requests], s)
  return per_device, sampling, kv_lens


def stack_params_padded(params: list[SamplingParams], size: int) -> dict[str, np.ndarray]:
  """`stack_params` padded with greedy rows to `size` (the sequence bucket)."""
  return stack_params(list(params) + [SamplingParams()] * (size - len(params)))
