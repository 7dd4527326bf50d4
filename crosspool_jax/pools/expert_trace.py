"""Routing traces: record the expert accesses of real runs, save them as JSONL, replay them.

A trace is a list of `TraceEvent`s, one per (step, model, MoE layer) in execution order: the
experts the router chose for that layer's valid tokens, and the experts the NEXT MoE layer's
router picked from the same hidden state (the activation-aware prediction), if any. Replaying a
trace through a host-side `WeightsPool` repeats exactly the decisions the live executor made
(`access`, then `prefetch` of the prediction when the policy prefetches), so policies can be
compared on one recorded workload, and Belady's MIN computed on it.

JSONL: one JSON object per line, keys "step", "model", "layer", "experts", "next_layer",
"predicted" (the last two may be null).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence

from crosspool_jax.pools.expert_policies import ExpertKey, belady_min
from crosspool_jax.pools.weights_pool import PoolStats, WeightsPool


@dataclasses.dataclass(frozen=True)
class TraceEvent:
  """One MoE layer run of one model.

  Attributes:
    step: index of the forward step (prefill or one decode token) in the run.
    model: model id.
    layer: the MoE layer.
    experts: sorted distinct experts the router chose for the valid tokens.
    next_layer: the model's next MoE layer in this step, or None (last MoE layer).
    predicted: experts of `next_layer` predicted from this layer's hidden state, or None.
  """

  step: int
  model: str
  layer: int
  experts: tuple[int, ...]
  next_layer: int | None = None
  predicted: tuple[int, ...] | None = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, line: str) -> TraceEvent:
    d = json.loads(line)
    missing = {"step", "model", "layer", "experts"} - set(d)
    if missing:
      raise ValueError(f"trace line lacks {sorted(missing)}: {line[:200]}")
    pred = d.get("predicted")
    return cls(int(d["step"]), str(d["model"]), int(d["layer"]),
               tuple(int(e) for e in d["experts"]),
               None if d.get("next_layer") is None else int(d["next_layer"]),
               None if pred is None else tuple(int(e) for e in pred))


def write_jsonl(events: Iterable[TraceEvent], path: str | os.PathLike) -> None:
  """Writes a trace, one event per line."""
  with open(path, "w") as f:
    for ev in events:
      f.write(ev.to_json() + "\n")


def read_jsonl(path: str | os.PathLike) -> list[TraceEvent]:
  """Reads a trace written by `write_jsonl` (blank lines skipped)."""
  events = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          events.append(TraceEvent.from_json(line))
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n}: bad trace line: {e}") from e
  return events


def replay(events: Sequence[TraceEvent], pool: WeightsPool, *, prefetch: bool | None = None
           ) -> PoolStats:
  """Runs a trace through a host-side pool (models registered); returns its stats.

  Args:
    events: the trace.
    pool: a `WeightsPool` with every model of the trace registered; mutated.
    prefetch: issue the recorded predictions as prefetches; default: if the policy prefetches.
  """
  if prefetch is None:
    prefetch = pool.policy.prefetches
  for ev in events:
    pool.access(ev.model, ev.layer, ev.experts)
    if prefetch and ev.predicted is not None and ev.next_layer is not None:
      pool.prefetch(ev.model, ev.next_layer, ev.predicted,
                    protect=[(ev.model, ev.layer, e) for e in ev.experts])
  return pool.stats


def partition_accesses(events: Sequence[TraceEvent], pool: WeightsPool
                       ) -> dict[tuple[int, int], list[ExpertKey]]:
  """The flattened access sequence of each (class, device) partition of `pool`."""
  out: dict[tuple[int, int], list[ExpertKey]] = {}
  for ev in events:
    part = (pool.model_class(ev.model), pool.home_device(ev.model, ev.layer))
    out.setdefault(part, []).extend((ev.model, ev.layer, e) for e in ev.experts)
  return out


def belady_stats(events: Sequence[TraceEvent], pool: WeightsPool) -> dict[str, int | float]:
  """Belady's MIN per partition of `pool` (capacity: its unpinned slots), summed.

  Returns {"accesses", "hits", "misses", "hit_rate"}. Call it on a freshly registered pool
  (pinned experts are taken as always resident: their accesses count as hits).
  """
  hits = misses = 0
  for (c, d), keys in partition_accesses(events, pool).items():
    cls = pool.classes[c]
    pinned = {cls.partitions[d].owner[s] for s in range(cls.slots_per_device)
              if cls.partitions[d].pinned[s]}
    rest = [k for k in keys if k not in pinned]
    hits += len(keys) - len(rest)
    capacity = cls.slots_per_device - len(pinned)
    if rest and capacity < 1:
      raise ValueError(f"partition (class {c}, device {d}) has no unpinned slot")
    if rest:
      h, m = belady_min(rest, capacity)
      hits, misses = hits + h, misses + m
  total = hits + misses
  return {"accesses": total, "hits": hits, "misses": misses,
          "hit_rate": hits / total if total else 0.0}


def prediction_accuracy(events: Sequence[TraceEvent], num_experts: Mapping[str, int]
                        ) -> dict[str, int | float]:
  """How well the recorded next-layer predictions name the experts that layer then used.

  Each event with a prediction is matched to the event of the same step and model at its
  `next_layer`; residency plays no part (this is the predictor, not the pool). Returns
  {"predictions": matched events, "predicted": experts predicted, "used": experts the
  predicted layers used, "correct": predicted and used, "precision": correct / predicted,
  "recall": correct / used, "chance_precision": the precision of as many experts drawn
  uniformly at random per prediction (used / E of that model, weighted by experts predicted)}.

  Args:
    events: the trace.
    num_experts: routed experts per layer of every model in the trace.
  """
  used = {(ev.step, ev.model, ev.layer): set(ev.experts) for ev in events}
  n = predicted = used_total = correct = 0
  chance = 0.0
  for ev in events:
    if ev.predicted is None or ev.next_layer is None:
      continue
    actual = used.get((ev.step, ev.model, ev.next_layer))
    if actual is None:
      raise ValueError(f"trace: step {ev.step} model {ev.model!r} predicts layer "
                       f"{ev.next_layer}, which has no event in that step")
    pred = set(ev.predicted)
    n += 1
    predicted += len(pred)
    used_total += len(actual)
    correct += len(pred & actual)
    chance += len(pred) * len(actual) / num_experts[ev.model]
  return {"predictions": n, "predicted": predicted, "used": used_total, "correct": correct,
          "precision": correct / predicted if predicted else 0.0,
          "recall": correct / used_total if used_total else 0.0,
          "chance_precision": chance / predicted if predicted else 0.0}
