"""A minimal multi-model paged generation loop over one KVPool, for tests.

Not the engine: it batches every live request of a model into one `forward_paged` call per
step (prefill chunk for new arrivals, one token for the others), grows pages through the
pool (with preemption: a victim loses its pages and is re-prefilled later from its prompt
and the tokens it already generated) and decodes greedily.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.paged import PagedBatch, forward_paged, forward_paged_spread
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool, PoolExhaustedError


@dataclasses.dataclass
class Req:
  rid: str
  model: str
  prompt: list[int]
  max_new: int
  arrival: int = 0
  out: list[int] = dataclasses.field(default_factory=list)
  cached: int = 0  # tokens whose K/V are in the pool
  admitted: bool = False
  preempted: int = 0

  @property
  def done(self):
    return len(self.out) >= self.max_new

  def pending(self):
    """Tokens to feed this step: everything not yet cached."""
    return (self.prompt + self.out)[self.cached:]


def run_paged(models: dict[str, tuple[ModelConfig, dict]], requests: list[Req], pool: KVPool,
              pools: list[jax.Array], *, max_batch: int, max_tokens: int, impl: str,
              max_steps: int = 200):
  """Serves `requests` to completion; returns ({rid: generated tokens}, pools, stats).

  `pools` holds one buffer per KV device of `pool`; with several, every step goes through
  `forward_paged_spread` (params must live on pools[0]'s device).
  """
  reqs = {r.rid: r for r in requests}
  stats = {"steps": 0, "preempted": 0}
  spread = set()  # requests whose pages ever lay on more than one device
  for step in range(max_steps):
    live = [r for r in requests if r.arrival <= step and not r.done]
    if not live:
      break
    stats["steps"] += 1
    for model_id, (cfg, params) in models.items():
      batch_reqs = []
      for r in (r for r in live if r.model == model_id):
        if len(batch_reqs) == max_batch:
          break
        if r.rid not in reqs or r.done:
          continue
        if not r.admitted:
          try:
            pool.add_request(model_id, r.rid)
          except PoolExhaustedError:
            continue
          r.admitted = True
        need = len(r.prompt) + len(r.out)
        try:
          victims = pool.grow_with_preemption(r.rid, need)
        except PoolExhaustedError:
          continue
        for v in victims:
          victim = reqs[v]
          victim.cached, victim.admitted = 0, False
          victim.preempted += 1
          stats["preempted"] += 1
          if victim in batch_reqs:
            batch_reqs.remove(victim)
        batch_reqs.append(r)
        tables = pool.tables(model_id, [r.rid])
        if np.unique(tables[tables > 0] // pool.pages_per_device).size > 1:
          spread.add(r.rid)
      if not batch_reqs:
        continue
      batches = [jax.device_put(_pack(pool, model_id, cfg, batch_reqs, max_batch, max_tokens,
                                      device=d), buf.devices().pop())
                 for d, buf in enumerate(pools)]
      if len(pools) == 1:
        logits_SV, pool_PE = forward_paged(params, pools[0], batches[0], cfg=cfg,
                                           attn_impl=impl, moe_impl=impl)
        pools = [pool_PE]
      else:
        logits_SV, pools = forward_paged_spread(params, pools, batches, cfg=cfg, attn_impl=impl,
                                                moe_impl=impl)
      next_S = np.asarray(jnp.argmax(logits_SV, axis=-1))
      for i, r in enumerate(batch_reqs):
        r.cached = len(r.prompt) + len(r.out)
        r.out.append(int(next_S[i]))
        if r.done:
          pool.release(r.rid)
          r.admitted = False
  stats["spread"] = len(spread)
  return {r.rid: r.out for r in requests}, pools, stats


def _pack(pool: KVPool, model_id: str, cfg: ModelConfig, batch_reqs: list[Req], max_batch: int,
          max_tokens: int, device: int) -> PagedBatch:
  page_tokens = pool.page_tokens(model_id)
  chunks = [r.pending() for r in batch_reqs]
  lens = np.array([len(c) for c in chunks])
  assert lens.sum() <= max_tokens, "test batch exceeds the token bucket"
  cu = np.zeros(max_batch + 1, np.int32)
  cu[1:len(chunks) + 1] = np.cumsum(lens)
  cu[len(chunks) + 1:] = cu[len(chunks)]
  tokens = np.zeros(max_tokens, np.int32)
  positions = np.full(max_tokens, -1, np.int32)
  batch_index = np.zeros(max_tokens, np.int64)
  kv_lens = np.zeros(max_batch, np.int32)
  for i, (r, c) in enumerate(zip(batch_reqs, chunks, strict=True)):
    tokens[cu[i]:cu[i + 1]] = c
    positions[cu[i]:cu[i + 1]] = np.arange(r.cached, r.cached + len(c))
    batch_index[cu[i]:cu[i + 1]] = i
    kv_lens[i] = r.cached + len(c)
  tables = pool.tables(model_id, [r.rid for r in batch_reqs])
  padded = np.zeros((tables.shape[0], max_batch, tables.shape[2]), np.int32)
  padded[:, :len(batch_reqs)] = pool.local_tables(tables, device)
  slots = pool.slot_mapping(tables, batch_index, positions, page_tokens, device=device)
  return PagedBatch(tokens_T=jnp.asarray(tokens), positions_T=jnp.asarray(positions),
                    cu_q_lens_S1=jnp.asarray(cu), kv_lens_S=jnp.asarray(kv_lens),
                    num_seqs_1=jnp.asarray([len(batch_reqs)], jnp.int32),
                    page_tables_LSP=jnp.asarray(padded), slot_mapping_LT=jnp.asarray(slots))


def kv_spec(model_id: str, cfg: ModelConfig, *, max_context: int, max_batch: int) -> KVModelSpec:
  return KVModelSpec(model_id, num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, max_context=max_context, max_batch=max_batch)
