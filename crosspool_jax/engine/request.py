"""Requests and their lifecycle (host side)."""

from __future__ import annotations

import dataclasses
import enum

from crosspool_jax.models.sampling import SamplingParams


class Status(enum.Enum):
  WAITING = "waiting"  # queued (new, or preempted and to be recomputed)
  RUNNING = "running"  # holds KV pages; prefilling or decoding
  FINISHED = "finished"
  CANCELLED = "cancelled"
  FAILED = "failed"  # its model's step raised; the reason is in Request.error


@dataclasses.dataclass(eq=False)
class Request:
  """One generation request and its serving state.

  Attributes:
    request_id: unique id.
    model_id: the registered model that serves it.
    prompt_ids: prompt token ids.
    sampling: sampling params (seeded: reproducible in any batch).
    max_new_tokens: generated tokens at most.
    stop_ids: a generated token in this set ends the request (kept in the output).
    output_ids: generated so far.
    num_cached: tokens of prompt + output whose K/V are in the pool.
    status, finish_reason: lifecycle.
    error: why it failed (Status.FAILED): the exception its model's step raised.
    arrival_s, admitted_s, first_token_s, finish_s: host clock (seconds).
    token_s: host clock of every generated token.
    preemptions: times its pages were taken and it was re-queued.
  """

  request_id: str
  model_id: str
  prompt_ids: list[int]
  sampling: SamplingParams
  max_new_tokens: int
  stop_ids: frozenset[int] = frozenset()
  output_ids: list[int] = dataclasses.field(default_factory=list)
  num_cached: int = 0
  status: Status = Status.WAITING
  finish_reason: str | None = None
  error: str | None = None
  arrival_s: float = 0.0
  admitted_s: float | None = None
  first_token_s: float | None = None
  finish_s: float | None = None
  token_s: list[float] = dataclasses.field(default_factory=list)
  preemptions: int = 0

  @property
  def num_tokens(self) -> int:
    """Prompt plus generated tokens: the context once every token is cached."""
    return len(self.prompt_ids) + len(self.output_ids)

  @property
  def num_pending(self) -> int:
    """Tokens not yet in the pool (the prefill / recompute left, or 1 while decoding)."""
    return self.num_tokens - self.num_cached

  def pending_ids(self, n: int) -> list[int]:
    """The next n tokens to feed."""
    seq = self.prompt_ids + self.output_ids
    return seq[self.num_cached:self.num_cached + n]

  @property
  def done(self) -> bool:
    return self.status in (Status.FINISHED, Status.CANCELLED, Status.FAILED)
