"""Iteration-level scheduler over every model (host side, no device calls).

Each iteration it builds, per model, a batch of (request, tokens to feed) under one token budget
shared by all models: round-robin fair shares, running requests before waiting ones, chunked
prefill, admission and preemption through the KV pool. Invariant: no model starves (each visited
model takes at most its fair share of the budget left), and a preempted request loses its pages
and is recomputed from prompt + generated tokens. With `decode_steps` > 1 a decode-only batch
reserves pages for several tokens (`reserve_decode_steps`, never preempting) and its tokens are
committed together (`commit_many`). The rules: WORKSPACE.md, "The engine and its memory
policies".
"""

from __future__ import annotations

import dataclasses

import numpy as np

from crosspool_jax.engine.request import Request, Status
from crosspool_jax.models.sampling import INVALID_TOKEN, NO_TOKEN
from crosspool_jax.pools.kv_pool import KVPool, PoolExhaustedError


@dataclasses.dataclass
class ModelBatch:
  """One model's share of an iteration: each request with the number of tokens to feed."""

  model_id: str
  requests: list[Request]
  num_new: list[int]
  # a decode-only batch run as several decode steps in one dispatch: per request, the tokens
  # it may generate (KV pages for them are reserved); None: one step
  decode_steps: list[int] | None = None

  @property
  def num_tokens(self) -> int:
    return sum(self.num_new)

  @property
  def num_sampled(self) -> int:
    """Requests that feed all they have left, so the step generates a token for them."""
    return sum(n == r.num_pending for r, n in zip(self.requests, self.num_new, strict=True))


class Scheduler:
  """Builds each iteration's per-model batches and keeps the KV pool in step with them.

  Args:
    pools: the KV pool serving each model (several models may share one).
    token_budget: tokens fed per iteration over all models.
    max_batch: sequences per model per iteration (the executor's sequence bucket).
    max_tokens: tokens per model per iteration (the executor's largest token bucket).
    decode_steps: decode steps a decode-only batch may run in one dispatch (1 = every
      iteration is one step); see `reserve_decode_steps`.
    max_prefill_chunk: prompt tokens (or tokens recomputed after a preemption) one request
      feeds per iteration at most; 0 = as many as the budget allows.
    short_prefills_first: within a model, a request whose pending tokens fit one chunk
      (`max_prefill_chunk`, or the budget) is fed before one whose do not, running or not: a
      short prompt arriving behind a long one gets its first token without waiting for the
      whole long prompt. False: running requests first, then waiting ones, each in arrival
      order (first come, first served).
  """

  def __init__(self, pools: dict[str, KVPool], *, token_budget: int, max_batch: int,
               max_tokens: int, decode_steps: int = 1, max_prefill_chunk: int = 0,
               short_prefills_first: bool = False):
    if token_budget < 1 or max_batch < 1 or max_tokens < 1 or decode_steps < 1:
      raise ValueError("token_budget, max_batch, max_tokens and decode_steps must be >= 1")
    if max_prefill_chunk < 0:
      raise ValueError(f"max_prefill_chunk must be >= 0 (0: no limit), got {max_prefill_chunk}")
    self.pools = dict(pools)
    self.token_budget = token_budget
    self.max_batch = max_batch
    self.max_tokens = max_tokens
    self.decode_steps = decode_steps
    self.max_prefill_chunk = max_prefill_chunk or token_budget
    self.short_prefills_first = short_prefills_first
    self.queues: dict[str, list[Request]] = {m: [] for m in pools}
    self._rotation = 0

  def add_model(self, model_id: str, pool: KVPool) -> None:
    """Serves a model registered while running (its queue starts empty)."""
    if model_id in self.pools:
      raise ValueError(f"model {model_id!r} is already scheduled")
    self.pools[model_id] = pool
    self.queues[model_id] = []

  def remove_model(self, model_id: str) -> list[Request]:
    """Stops serving a model: releases its running requests' pages; returns its queue."""
    queue = list(self.queues[model_id])
    for request in queue:
      self.remove(request)
    del self.queues[model_id], self.pools[model_id]
    return queue

  def add(self, request: Request) -> None:
    self.queues[request.model_id].append(request)

  def remove(self, request: Request) -> None:
    """Drops a request (finished, cancelled or failed), returning its pages."""
    pool = self.pools[request.model_id]
    if request.status == Status.RUNNING and pool.has_request(request.request_id):
      pool.release(request.request_id)
    self.queues[request.model_id].remove(request)

  def running(self, model_id: str | None = None) -> list[Request]:
    """Requests holding KV pages (of one model, or of all)."""
    models = self.queues if model_id is None else [model_id]
    return [r for m in models for r in self.queues[m] if r.status == Status.RUNNING]

  def requeue_evicted(self) -> list[Request]:
    """Re-queues running requests whose pages their pool no longer holds (see the module
    docstring); returns them."""
    evicted = [r for r in self.running() if not self.pools[r.model_id].has_request(r.request_id)]
    for request in evicted:
      self._preempted(request)
    return evicted

  def commit(self, batch: ModelBatch, tokens_B, now: float
             ) -> list[tuple[Request, int | None, str | None]]:
    """Records what a batch computed: every request's fed tokens are now cached; a request
    that has fed all it had gets its sampled token, and finishes on a stop id or at
    max_new_tokens (its pages return). A token sampled from non-finite logits
    (`INVALID_TOKEN`) fails its request instead.

    Returns:
      (request, its new token or None if it failed, finish reason or None) per new token.
    """
    out = []
    for r, n, tok in zip(batch.requests, batch.num_new, tokens_B, strict=True):
      r.num_cached += n
      if r.num_pending > 0:  # mid-prefill (or mid-recompute): no token yet
        continue
      out.append(self._record(r, int(tok), now))
    return out

  def commit_many(self, batch: ModelBatch, tokens_BN, now: float
                  ) -> list[tuple[Request, int | None, str | None]]:
    """`commit` of a multi-step decode batch: row i of `tokens_BN` holds the tokens request i
    generated in order (`NO_TOKEN` past its last). Each token is committed by `commit`'s
    rules, the token before it counting as fed; the first that finishes or fails the request
    ends its row (later ones are dropped), and its pages return, those reserved for tokens it
    did not generate included. Every token gets the time `now` (the dispatch's end)."""
    for r, k, row in zip(batch.requests, batch.decode_steps, tokens_BN, strict=True):
      if (np.asarray(row)[k:] != NO_TOKEN).any():  # checked before anything is committed
        raise RuntimeError(f"request {r.request_id!r} got tokens past the {k} its KV pages "
                           f"were reserved for: {list(row)}")
    out = []
    for r, row in zip(batch.requests, tokens_BN, strict=True):
      for tok in row:
        tok = int(tok)
        if tok == NO_TOKEN:
          break
        r.num_cached += 1  # the pending token was fed
        event = self._record(r, tok, now)
        out.append(event)
        if event[2] is not None:
          break
    return out

  def _record(self, r: Request, tok: int, now: float) -> tuple[Request, int | None, str | None]:
    """A request's next sampled token (all its tokens fed): appended, or it fails / finishes
    (its pages return)."""
    if tok == INVALID_TOKEN:
      self.remove(r)
      r.status, r.finish_reason, r.finish_s = Status.FAILED, "error", now
      r.error = (f"non-finite logits at position {r.num_tokens}: corrupted KV pages or "
                 "weights of this request's model")
      return r, None, "error"
    r.output_ids.append(tok)
    r.token_s.append(now)
    if r.first_token_s is None:
      r.first_token_s = now
    reason = ("stop" if tok in r.stop_ids else
              "length" if len(r.output_ids) >= r.max_new_tokens else None)
    if reason:
      self.remove(r)
      r.status, r.finish_reason, r.finish_s = Status.FINISHED, reason, now
    return r, tok, reason

  def reserve_decode_steps(self, batch: ModelBatch) -> None:
    """Makes a decode-only batch (each request feeds its 1 pending token) a multi-step one:
    grows each request's pages for up to `decode_steps` tokens, bounded by what it may still
    generate and by the free pages (fewer, down to 1, when the pool cannot grow; never
    preempting), and sets `batch.decode_steps`; left None if no request gets more than 1."""
    if self.decode_steps == 1 or not batch.requests or any(
        n != 1 or r.num_pending != 1 for r, n in zip(batch.requests, batch.num_new,
                                                      strict=True)):
      return
    pool = self.pools[batch.model_id]
    steps = []
    for r in batch.requests:
      k = min(self.decode_steps, r.max_new_tokens - len(r.output_ids))
      while k > 1 and not pool.can_grow(r.request_id, r.num_cached + k):
        k -= 1
      pool.grow(r.request_id, r.num_cached + max(k, 1))  # 1 token: held since `schedule`
      steps.append(max(k, 1))
    if max(steps) > 1:
      batch.decode_steps = steps

  def has_work(self) -> bool:
    return any(self.queues.values())

  def schedule(self) -> list[ModelBatch]:
    """The next iteration's batches (at most one per model)."""
    self.requeue_evicted()
    models = [m for m in self.queues if self.queues[m]]
    if not models:
      return []
    start = self._rotation % len(models)
    self._rotation += 1
    order = models[start:] + models[:start]
    budget = self.token_budget
    batches: list[ModelBatch] = []
    for i, model_id in enumerate(order):
      share = (budget - sum(b.num_tokens for b in batches)) // (len(order) - i)
      batch = ModelBatch(model_id, [], [])
      batches.append(batch)
      self._schedule_model(batch, min(share, self.max_tokens), batches)
    batches = [b for b in batches if b.requests]
    for batch in batches:  # after every admission and preemption of this iteration
      self.reserve_decode_steps(batch)
    return batches

  def _schedule_model(self, batch: ModelBatch, budget: int, batches: list[ModelBatch]) -> None:
    pool = self.pools[batch.model_id]
    queue = self.queues[batch.model_id]
    queue.sort(key=self._order)
    admitting = True
    for req in list(queue):
      if budget <= 0 or len(batch.requests) == self.max_batch:
        break
      n = min(req.num_pending, budget, self.max_prefill_chunk)
      if req.status == Status.WAITING:
        # in arrival order (among short or long prompts): no later waiting request jumps a
        # blocked one, but the running requests after it are still fed
        admitting = admitting and self._admit(pool, req, n)
        if not admitting:
          continue
      elif not self._grow(pool, req, n, batches):
        continue
      batch.requests.append(req)
      batch.num_new.append(n)
      budget -= n

  def _order(self, req: Request) -> tuple:
    """Sort key of a model's queue: decodes (one token pending) and running prefills before
    waiting requests, each in arrival order; with `short_prefills_first`, prompts that do not
    fit one chunk after all the others."""
    key = (req.status != Status.RUNNING, req.num_pending > 1, req.arrival_s)
    if self.short_prefills_first:
      return (req.num_pending > self.max_prefill_chunk, *key)
    return key

  def _admit(self, pool: KVPool, req: Request, n: int) -> bool:
    if not pool.has_free_row(req.model_id):  # max_batch requests hold its rows already
      return False
    pool.add_request(req.model_id, req.request_id)
    if pool.can_grow(req.request_id, req.num_cached + n):
      pool.grow(req.request_id, req.num_cached + n)
      req.status = Status.RUNNING
      return True
    pool.release(req.request_id)
    return False

  def _grow(self, pool: KVPool, req: Request, n: int, batches: list[ModelBatch]) -> bool:
    try:
      victims = pool.grow_with_preemption(req.request_id, req.num_cached + n)
    except PoolExhaustedError:
      self._preempted(req)
      pool.release(req.request_id)
      return False
    for victim_id in victims:
      victim = next(r for q in self.queues.values() for r in q if r.request_id == victim_id)
      self._preempted(victim)
      for batch in batches:  # it may already be scheduled in this iteration
        if victim in batch.requests:
          i = batch.requests.index(victim)
          del batch.requests[i], batch.num_new[i]
    return True

  def _preempted(self, req: Request) -> None:
    req.status = Status.WAITING
    req.num_cached = 0
    req.preemptions += 1
