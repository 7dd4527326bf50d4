"""Probes of host KV pools: how far one request grows, how many tokens requests hold.

Each probe drives a real `KVPool` (its own page accounting, admission and errors) until
`PoolExhaustedError`; the capacity analysis compares what they measure with each policy's
closed form. Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from crosspool_jax.pools.kv_pool import KVPool, PoolExhaustedError


def grow_max(pool: KVPool, model: str, request_id: str, cap_tokens: int) -> int:
  """Grows a request of `model` (doubling its pages, then bisecting) until PoolExhaustedError.

  `KVPool.grow` is all-or-nothing, so a failed step leaves the request as it was. Returns the
  tokens it holds: the most (<= cap_tokens) that the pool could give it.
  """
  pt = pool.page_tokens(model)
  max_pages = math.ceil(cap_tokens / pt)
  tokens = lambda p: min(p * pt, cap_tokens)  # noqa: E731
  lo, hi, p = 0, max_pages + 1, 1  # lo: held; hi: known to fail (or past the cap)
  while p <= max_pages:
    try:
      pool.grow(request_id, tokens(p))
      lo, p = p, 2 * p
    except PoolExhaustedError:
      hi = p
      break
  if lo < max_pages and p > max_pages:
    p = max_pages
    try:
      pool.grow(request_id, tokens(p))
      lo = p
    except PoolExhaustedError:
      hi = p
  while hi - lo > 1:
    mid = (lo + hi) // 2
    try:
      pool.grow(request_id, tokens(mid))
      lo = mid
    except PoolExhaustedError:
      hi = mid
  return tokens(lo) if lo else 0


def fill(pool: KVPool, models: Sequence[str], caps: Mapping[str, int]) -> dict[str, int]:
  """Admits requests of `models` round robin, each grown to its cap, until nothing fits.

  Returns tokens held per model. The pool keeps the requests (callers use a fresh pool).
  """
  held = dict.fromkeys(models, 0)
  active = list(models)
  n = 0
  while active:
    for m in list(active):
      rid = f"fill-{m}-{n}"
      n += 1
      try:
        pool.add_request(m, rid)
      except PoolExhaustedError:  # no row left
        active.remove(m)
        continue
      got = grow_max(pool, m, rid, caps[m])
      if got == 0:
        pool.release(rid)
        active.remove(m)
      held[m] += got
  pool.check_invariants()
  return held


def longest(pool: KVPool, model: str, cap: int) -> int:
  """One request of `model` alone in `pool`, grown until the pool (or cap) stops it."""
  rid = f"longest-{model}"
  pool.add_request(model, rid)
  got = grow_max(pool, model, rid, cap)
  pool.check_invariants()
  pool.release(rid)
  return got
