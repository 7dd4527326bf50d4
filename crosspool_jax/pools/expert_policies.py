"""Replacement policies of the weights pool, and Belady's MIN (the offline bound).

Host-side only (plain Python / numpy, no JAX). The pool calls an `ExpertPolicy`'s `on_insert`,
`on_access`, `on_evict` and `choose_victim`; `now` is the pool's logical clock (one tick per
layer access). Invariant: `choose_victim` picks among the candidates it is given, which never
include pinned experts nor the experts the running layer needs. The policies (`pin_all`, `lru`,
`lfu`, `activation_aware`) and `belady_min`: WORKSPACE.md, "The pools".
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence

ExpertKey = tuple[str, int, int]  # (model_id, layer, expert)


class ExpertPolicy:
  """Base class: the hooks the pool calls. Subclasses override `choose_victim` at least.

  Attributes:
    name: registry name.
    pins_all: the pool pins every expert at registration (and refuses models that do not fit).
    prefetches: the executor should pass next-layer predictions to `WeightsPool.prefetch`.
  """

  name = "base"
  pins_all = False
  prefetches = False

  def on_insert(self, key: ExpertKey, now: int) -> None:
    """`key` was loaded into a slot (on demand or by prefetch)."""

  def on_access(self, key: ExpertKey, now: int) -> None:
    """A layer read `key` (it is resident)."""

  def on_evict(self, key: ExpertKey) -> None:
    """`key` left its slot."""

  def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
    """One of `candidates` (non-empty: resident, unpinned, not needed by the running layer)."""
    raise NotImplementedError

  # Whether `priority` exists: a key whose minimum over the candidates is `choose_victim`'s
  # choice at any time, and which changes only when that expert's own `on_insert` / `on_access`
  # runs, so a pool may keep its resident experts in a heap (else it scans them).
  has_priority = False

  def priority(self, key: ExpertKey) -> tuple:
    raise NotImplementedError(f"{self.name} has no static victim priority")


class PinAllPolicy(ExpertPolicy):
  """Everything resident and pinned; asking for a victim is a bug of the caller."""

  name = "pin_all"
  pins_all = True

  def choose_victim(self, candidates, now):
    raise RuntimeError("pin_all policy never evicts; every expert should be pinned")


class LRUPolicy(ExpertPolicy):
  """Least recently used first."""

  name = "lru"
  has_priority = True

  def __init__(self):
    self._last: dict[ExpertKey, int] = {}

  def on_insert(self, key, now):
    self._last.setdefault(key, -1)

  def on_access(self, key, now):
    self._last[key] = now

  def on_evict(self, key):
    self._last.pop(key, None)

  def priority(self, key):
    return self._last.get(key, -1), key

  def choose_victim(self, candidates, now):
    return min(candidates, key=self.priority)


class LFUPolicy(LRUPolicy):
  """Least frequently used first (counts kept across evictions), ties by LRU."""

  name = "lfu"

  def __init__(self):
    super().__init__()
    self._count: dict[ExpertKey, int] = {}

  def on_access(self, key, now):
    super().on_access(key, now)
    self._count[key] = self._count.get(key, 0) + 1

  def priority(self, key):
    return self._count.get(key, 0), self._last.get(key, -1), key


class ActivationAwarePolicy(LRUPolicy):
  """Decayed per-model routing frequency for eviction, plus next-layer prediction (prefetch).

  Args:
    half_life: accesses (pool clock ticks) after which a routing count weighs half.
  """

  name = "activation_aware"
  prefetches = True

  def __init__(self, half_life: float = 64.0):
    super().__init__()
    if not half_life > 0:
      raise ValueError(f"half_life must be > 0, got {half_life}")
    self.half_life = float(half_life)
    self._score: dict[ExpertKey, tuple[float, int]] = {}  # key -> (decayed count, at clock)

  def _decayed(self, key: ExpertKey, now: int) -> float:
    value, at = self._score.get(key, (0.0, now))
    return value * math.exp2(-(now - at) / self.half_life)

  def on_access(self, key, now):
    super().on_access(key, now)
    self._score[key] = (self._decayed(key, now) + 1.0, now)

  has_priority = False  # decayed counts order the experts exactly only at a given time

  def choose_victim(self, candidates, now):
    return min(candidates, key=lambda k: (self._decayed(k, now), self._last.get(k, -1), k))


POLICIES = {cls.name: cls for cls in (PinAllPolicy, LRUPolicy, LFUPolicy, ActivationAwarePolicy)}


def make_policy(name: str, **kwargs) -> ExpertPolicy:
  """A fresh policy by registry name (`POLICIES`)."""
  if name not in POLICIES:
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
  return POLICIES[name](**kwargs)


def belady_min(accesses: Sequence[Hashable], capacity: int) -> tuple[int, int]:
  """Belady's MIN on one cache partition: returns (hits, misses).

  On a miss with a full cache it evicts the resident item whose next access is farthest in the
  future (never accessed again first). With group accesses (a layer needing several experts
  at once) flatten them in order: the constraint that a group be co-resident only restricts the
  online policies, so MIN of the flattened sequence stays an upper bound on their hits.

  Args:
    accesses: the items in access order (any hashables, e.g. (model, layer, expert)).
    capacity: slots of the partition (>= 1).
  """
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")
  n = len(accesses)
  next_use = [n] * n
  seen: dict[Hashable, int] = {}
  for i in range(n - 1, -1, -1):
    next_use[i] = seen.get(accesses[i], n)
    seen[accesses[i]] = i
  resident: dict[Hashable, int] = {}  # item -> its next use
  heap: list[tuple[int, int]] = []  # (-next use, access index of the item), lazy
  hits = 0
  for i, item in enumerate(accesses):
    if item in resident:
      hits += 1
    elif len(resident) >= capacity:
      while True:
        neg_next, j = heapq.heappop(heap)
        victim = accesses[j]
        if resident.get(victim) == -neg_next:
          del resident[victim]
          break
    resident[item] = next_use[i]
    heapq.heappush(heap, (-next_use[i], i))
  return hits, n - hits
