"""Trace records (one request each), their prompts, and JSONL files for replay.

A trace is a list of `TraceRecord`s. On disk it is JSONL: an optional first line
`{"meta": {...}}` (how the trace was made), then one JSON object per record:

  {"arrival_s": 0.41, "model_id": "mix-0", "prompt_len": 37, "max_new_tokens": 16, "seed": 91}

`prompt_ids` may replace (or accompany, if consistent) `prompt_len`; otherwise the prompt's
token ids are derived from the record's seed by `prompt_ids`, so a trace replays exactly.
numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_FIELDS = ("arrival_s", "model_id", "prompt_len", "max_new_tokens", "seed", "prompt_ids")
_PROMPT_STREAM = 0x70524F4D  # mixed into the record seed: prompt ids use their own stream


class TraceFormatError(ValueError):
  """A trace file line that is not a valid record (the message starts with `file:line:`)."""


def _is_int(x: Any) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class TraceRecord:
  """One request of a trace.

  Attributes:
    arrival_s: seconds after the start of the trace at which the request arrives (>= 0).
    model_id: the model that serves it.
    prompt_len: prompt tokens (>= 1).
    max_new_tokens: tokens to generate at most (>= 1).
    seed: the request's seed in [0, 2**32): its prompt ids (unless given) and its sampling.
    prompt_ids: explicit prompt token ids (length prompt_len), or None to derive them from
      the seed (see `prompt_ids`).
  """

  arrival_s: float
  model_id: str
  prompt_len: int
  max_new_tokens: int
  seed: int
  prompt_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    if not (isinstance(self.arrival_s, int | float | np.floating)
            and not isinstance(self.arrival_s, bool)
            and math.isfinite(self.arrival_s) and self.arrival_s >= 0):
      raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
    if not isinstance(self.model_id, str) or not self.model_id:
      raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
    if not _is_int(self.prompt_len) or self.prompt_len < 1:
      raise ValueError(f"prompt_len must be an integer >= 1, got {self.prompt_len!r}")
    if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
    if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    if self.prompt_ids is not None:
      ids = self.prompt_ids
      if (not isinstance(ids, Sequence) or isinstance(ids, str)
          or not all(_is_int(t) and t >= 0 for t in ids)):
        raise ValueError("prompt_ids must be a list of integers >= 0")
      if len(ids) != self.prompt_len:
        raise ValueError(f"prompt_ids has {len(ids)} tokens but prompt_len is "
                         f"{self.prompt_len}")
      object.__setattr__(self, "prompt_ids", tuple(int(t) for t in ids))
    object.__setattr__(self, "arrival_s", float(self.arrival_s))
    for name in ("prompt_len", "max_new_tokens", "seed"):
      object.__setattr__(self, name, int(getattr(self, name)))

  def to_json(self) -> dict:
    """The record as a JSON-ready dict (`prompt_ids` only when explicit)."""
    out = {"arrival_s": self.arrival_s, "model_id": self.model_id,
           "prompt_len": self.prompt_len, "max_new_tokens": self.max_new_tokens,
           "seed": self.seed}
    if self.prompt_ids is not None:
      out["prompt_ids"] = list(self.prompt_ids)
    return out

  @classmethod
  def from_json(cls, obj: Any) -> TraceRecord:
    """Builds a record from a parsed JSON object; ValueError names what is wrong."""
    if not isinstance(obj, dict):
      raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
      raise ValueError(f"unknown field(s) {unknown}; a record has {list(_FIELDS)}")
    missing = [k for k in ("arrival_s", "model_id", "max_new_tokens", "seed") if k not in obj]
    if missing:
      raise ValueError(f"missing field(s) {missing}")
    if "prompt_len" not in obj and "prompt_ids" not in obj:
      raise ValueError("a record needs prompt_len or prompt_ids")
    ids = obj.get("prompt_ids")
    if ids is not None and not isinstance(ids, list):
      raise ValueError(f"prompt_ids must be a list of integers, got {type(ids).__name__}")
    prompt_len = obj.get("prompt_len", len(ids) if ids is not None else None)
    return cls(arrival_s=obj["arrival_s"], model_id=obj["model_id"], prompt_len=prompt_len,
               max_new_tokens=obj["max_new_tokens"], seed=obj["seed"], prompt_ids=ids)


def prompt_ids(record: TraceRecord, vocab_size: int, *, low: int = 0) -> list[int]:
  """The record's prompt token ids: explicit ones, or drawn from its seed.

  Args:
    record: the trace record.
    vocab_size: ids are drawn uniformly from [low, vocab_size) (the serving model's vocab).
    low: smallest id drawn (e.g. to avoid special tokens).

  The same record and vocab always give the same ids (a stream of its own, seeded by
  (record.seed, a constant), independent of the trace generator's state).
  """
  if not _is_int(vocab_size) or vocab_size < 1:
    raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
  if not _is_int(low) or not 0 <= low < vocab_size:
    raise ValueError(f"low must be an integer in [0, vocab_size={vocab_size}), got {low!r}")
  if record.prompt_ids is not None:
    return list(record.prompt_ids)
  rng = np.random.default_rng([record.seed, _PROMPT_STREAM])
  return rng.integers(low, vocab_size, size=record.prompt_len).tolist()


def write_jsonl(path: str | os.PathLike, records: Iterable[TraceRecord], *,
                meta: dict | None = None) -> None:
  """Writes records as JSONL, after an optional `{"meta": meta}` line.

  Args:
    path: output file (its directory must exist).
    records: the trace.
    meta: JSON-serialisable description of how the trace was made (generator config, seed).
  """
  with open(path, "w") as f:
    if meta is not None:
      f.write(json.dumps({"meta": meta}) + "\n")
    for r in records:
      f.write(json.dumps(r.to_json()) + "\n")


def _lines(path: str | os.PathLike):
  with open(path) as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise TraceFormatError(f"{path}:{lineno}: not valid JSON: {e}") from e
        yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[TraceRecord]:
  """Reads a JSONL trace (the meta line, if any, is skipped; blank lines are ignored).

  Raises:
    TraceFormatError: `path:line: reason` for the first bad line.
    FileNotFoundError: no such file.
  """
  records = []
  for lineno, obj in _lines(path):
    if lineno == 1 and isinstance(obj, dict) and set(obj) == {"meta"}:
      continue
    try:
      records.append(TraceRecord.from_json(obj))
    except ValueError as e:
      raise TraceFormatError(f"{path}:{lineno}: {e}") from e
  return records


def read_meta(path: str | os.PathLike) -> dict | None:
  """The `meta` object of a JSONL trace's first line, or None if it has none."""
  for lineno, obj in _lines(path):
    if lineno == 1 and isinstance(obj, dict) and set(obj) == {"meta"}:
      return obj["meta"]
    return None
  return None
