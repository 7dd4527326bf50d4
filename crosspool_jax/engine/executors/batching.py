"""Batching shared by the executors: a step's host arrays, token buckets, padded sampling.

Sequences are padded to `max_batch`, tokens to the smallest compiled token bucket that holds
them, page tables to the model's max pages; padding tokens have position -1. `pack` puts a
step's named arrays in ONE int32 buffer (32-bit floats and uints bitcast) by a static, hashable
`PackedLayout`; `unpack` slices them back out inside a jit, so a step is one transfer.
`decode_arrays` are the inputs of a multi-step decode batch (`ModelBatch.decode_steps`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models.paged import PagedBatch
from crosspool_jax.models.sampling import INVALID_TOKEN, NO_TOKEN, SamplingParams, stack_params
from crosspool_jax.pools.kv_pool import KVPool


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


# --- one packed transfer per step -----------------------------------------------------------

_PACKABLE = ("int32", "float32", "uint32")  # 32-bit dtypes: bitcast to int32 and back


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """Where each named array lies in a packed int32 buffer (hashable: a static jit argument).

  `fields`: (name, shape, dtype name, offset) per array, in packing order; `size`: the
  buffer's length in int32 words.
  """

  fields: tuple[tuple[str, tuple[int, ...], str, int], ...]
  size: int

  @classmethod
  def of(cls, shapes: dict[str, tuple[tuple[int, ...], str]]) -> PackedLayout:
    """The layout of arrays given as name -> (shape, dtype name), in that order."""
    fields, offset = [], 0
    for name, (shape, dtype) in shapes.items():
      dtype = np.dtype(dtype).name
      if dtype not in _PACKABLE:
        raise ValueError(f"cannot pack {name!r} of dtype {dtype}: only {_PACKABLE}")
      shape = tuple(int(d) for d in shape)
      fields.append((name, shape, dtype, offset))
      offset += math.prod(shape)
    return cls(tuple(fields), offset)

  @classmethod
  def like(cls, arrays: dict[str, np.ndarray]) -> PackedLayout:
    return cls.of({k: (np.shape(v), np.asarray(v).dtype) for k, v in arrays.items()})


def pack(arrays: dict[str, np.ndarray], layout: PackedLayout) -> np.ndarray:
  """The arrays in ONE int32 buffer (32-bit floats and uints bitcast), by `layout`."""
  if [f[0] for f in layout.fields] != list(arrays):
    raise ValueError(f"arrays {list(arrays)} do not match the layout "
                     f"{[f[0] for f in layout.fields]}")
  buf = np.empty(layout.size, np.int32)
  for name, shape, dtype, offset in layout.fields:
    a = np.asarray(arrays[name])
    if a.shape != shape or a.dtype != dtype:  # (a dtype against its name: ~30x faster than .name)
      raise ValueError(f"{name}: got {a.dtype.name}{list(a.shape)}, the layout has "
                       f"{dtype}{list(shape)}")
    buf[offset:offset + a.size] = np.ascontiguousarray(a).reshape(-1).view(np.int32)
  return buf


def unpack(buf_N: jax.Array, layout: PackedLayout) -> dict[str, jax.Array]:
  """Inverse of `pack`, traceable (slices, reshapes and bitcasts inside a jit)."""
  out = {}
  for name, shape, dtype, offset in layout.fields:
    flat = jax.lax.slice_in_dim(buf_N, offset, offset + math.prod(shape))
    if dtype != "int32":
      flat = jax.lax.bitcast_convert_type(flat, jnp.dtype(dtype))
    out[name] = flat.reshape(shape)
  return out


SAMPLING_KEYS = tuple(stack_params([]))  # the sampling arrays' names, in packing order
MAX_STOP_IDS = 4  # stop ids per request a multi-step decode loop checks on device


def step_arrays(paged: PagedBatch, sampling: dict[str, np.ndarray],
                next_positions_S: np.ndarray) -> dict[str, np.ndarray]:
  """A one-step batch's host arrays by name: the PagedBatch fields, sampling, positions."""
  return ({f.name: getattr(paged, f.name) for f in dataclasses.fields(PagedBatch)}
          | {k: sampling[k] for k in SAMPLING_KEYS} | {"next_positions_S": next_positions_S})


def step_inputs(arrays: dict[str, jax.Array]):
  """`step_arrays`' inverse, on the unpacked device arrays: (PagedBatch, sampling, positions)."""
  paged = PagedBatch(**{f.name: arrays[f.name] for f in dataclasses.fields(PagedBatch)})
  return paged, {k: arrays[k] for k in SAMPLING_KEYS}, arrays["next_positions_S"]


def decode_limits(batch: ModelBatch, max_batch: int) -> dict[str, np.ndarray]:
  """How far each request of a multi-step decode batch may run, padded to `max_batch`: the
  tokens it may generate (`steps_S`, 0 on padding rows, and on every row of a batch that is
  not multi-step) and up to `MAX_STOP_IDS` of its stop ids (`stop_ids_S4`, `NO_TOKEN` fills;
  the host commit checks them all)."""
  s, n = max_batch, len(batch.requests)
  if n > s:
    raise RuntimeError(f"{n} sequences exceed max_batch {s}")
  steps = np.zeros(s, np.int32)
  stops = np.full((s, MAX_STOP_IDS), NO_TOKEN, np.int32)
  for i, (r, k) in enumerate(zip(batch.requests, batch.decode_steps or (), strict=False)):
    steps[i] = k
    ids = sorted(r.stop_ids)[:MAX_STOP_IDS]
    stops[i, :len(ids)] = ids
  return {"steps_S": steps, "stop_ids_S4": stops}


def decode_arrays(pool: KVPool, batch: ModelBatch, max_batch: int) -> dict[str, np.ndarray]:
  """Host arrays of a multi-step decode batch (`batch.decode_steps` set), padded to
  `max_batch`: each request's pending token and its position, its `decode_limits`, its page
  tables (the pool's device 0: a colocated pool has one), its sampling arrays."""
  s, n = max_batch, len(batch.requests)
  limits = decode_limits(batch, s)
  tokens = np.zeros(s, np.int32)
  positions = np.zeros(s, np.int32)
  for i, r in enumerate(batch.requests):
    tokens[i] = r.pending_ids(1)[0]
    positions[i] = r.num_cached
  tables = pool.tables(batch.model_id, [r.request_id for r in batch.requests])
  local = np.zeros((tables.shape[0], s, tables.shape[2]), np.int32)
  local[:, :n] = pool.local_tables(tables, 0)
  sampling = stack_params_padded([r.sampling for r in batch.requests], s)
  return ({"tokens_S": tokens, "positions_S": positions, "steps_S": limits["steps_S"],
           "num_seqs_1": np.asarray([n], np.int32), "page_tables_LSP": local,
           "stop_ids_S4": limits["stop_ids_S4"]} | {k: sampling[k] for k in SAMPLING_KEYS})


def decode_slots(tables_LSP: jax.Array, pos_S: jax.Array, alive_S: jax.Array,
                 page_tokens: int) -> jax.Array:
  """int32 [L, S] local KV slot of each live sequence's token at `pos_S` (its page from the
  page table); 0 (the null page) for a finished or padding sequence or a page held elsewhere."""
  page_LS = tables_LSP[:, jnp.arange(pos_S.shape[0]), pos_S // page_tokens]
  return jnp.where(alive_S & (page_LS > 0), page_LS * page_tokens + pos_S % page_tokens,
                   0).astype(jnp.int32)


def decode_stopped(next_S: jax.Array, count_S: jax.Array, steps_S: jax.Array,
                   stops_S4: jax.Array) -> jax.Array:
  """Whether a sequence of a multi-step decode stops after sampling `next_S`: an
  `INVALID_TOKEN`, one of its stop ids, or its `count_S`-th token reaching its `steps_S`."""
  return ((next_S == INVALID_TOKEN) | (next_S[:, None] == stops_S4).any(-1)
          | (count_S >= steps_S))
