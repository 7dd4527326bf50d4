"""Batching shared by the executors: a step's host arrays, token buckets, padded sampling.

Sequences are padded to `max_batch`, tokens to the smallest compiled token bucket that holds
them, page tables to the model's max pages; padding tokens have position -1.
"""

from __future__ import annotations

import bisect

import numpy as np

from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models.paged import PagedBatch
from crosspool_jax.models.sampling import SamplingParams, stack_params
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
