"""Serving metrics: per request, per model and per KV pool, exported as JSON.

Latencies come from the host clock at the moment each step's sampled tokens reach the host
(the tokens are needed there for stop checks anyway), so they include dispatch and transfer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from crosspool_jax.engine.request import Request, Status

PERCENTILES = (50, 90, 99)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
  """{"p50": .., "p90": .., "p99": .., "mean": .., "count": n} (None without values)."""
  if len(values) == 0:
    return {f"p{p}": None for p in PERCENTILES} | {"mean": None, "count": 0}
  arr = np.asarray(values, np.float64)
  return ({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
          | {"mean": float(arr.mean()), "count": int(arr.size)})


STEP_KINDS = ("decode", "prefill")


def step_kind(batches: Iterable) -> str:
  """"prefill" if the step feeds some request more than one token (a prompt chunk, or the
  whole prompt), else "decode" (every request feeds its one pending token; a one-token prompt
  counts here too)."""
  return "prefill" if any(n > 1 for b in batches for n in b.num_new) else "decode"


def steps_by_kind(steps: Sequence[tuple[str, float, int]]) -> dict:
  """Per step kind (`step_kind`), from (kind, step seconds, tokens generated) per step: the
  steps, their seconds' percentiles, the tokens generated and their share of all generated
  tokens (each token's inter-token gap is its step's time, so this says which steps a TBT
  percentile falls in)."""
  total = sum(n for _, _, n in steps)
  out = {}
  for kind in STEP_KINDS:
    mine = [(s, n) for k, s, n in steps if k == kind]
    tokens = sum(n for _, n in mine)
    out[kind] = {"steps": len(mine), "step_s": percentiles([s for s, _ in mine]),
                 "tokens": tokens, "token_share": tokens / total if total else 0.0}
  return out


def request_metrics(r: Request) -> dict:
  """TTFT, every inter-token gap (TBT), end-to-end latency, queueing time, preemptions."""
  return {
      "request_id": r.request_id, "model_id": r.model_id, "status": r.status.value,
      "finish_reason": r.finish_reason, "error": r.error, "prompt_tokens": len(r.prompt_ids),
      "output_tokens": len(r.output_ids), "preemptions": r.preemptions,
      "queue_s": None if r.admitted_s is None else r.admitted_s - r.arrival_s,
      "ttft_s": None if r.first_token_s is None else r.first_token_s - r.arrival_s,
      "tbt_s": np.diff(r.token_s).tolist(),
      "e2e_s": None if r.finish_s is None else r.finish_s - r.arrival_s,
  }


def summarize(requests: Iterable[Request]) -> dict:
  """Per-model and overall percentiles of TTFT, TBT, e2e and queueing."""
  per_model: dict[str, list[dict]] = {}
  for r in requests:
    per_model.setdefault(r.model_id, []).append(request_metrics(r))

  def agg(rows: list[dict]) -> dict:
    done = [m for m in rows if m["status"] == Status.FINISHED.value]
    return {
        "requests": len(rows), "finished": len(done),
        "cancelled": sum(m["status"] == Status.CANCELLED.value for m in rows),
        "failed": sum(m["status"] == Status.FAILED.value for m in rows),
        "preemptions": sum(m["preemptions"] for m in rows),
        "output_tokens": sum(m["output_tokens"] for m in rows),
        "ttft_s": percentiles([m["ttft_s"] for m in done if m["ttft_s"] is not None]),
        "tbt_s": percentiles([g for m in done for g in m["tbt_s"]]),
        "e2e_s": percentiles([m["e2e_s"] for m in done]),
        "queue_s": percentiles([m["queue_s"] for m in done if m["queue_s"] is not None]),
    }

  everything = [m for rows in per_model.values() for m in rows]
  return {"overall": agg(everything),
          "per_model": {k: agg(v) for k, v in sorted(per_model.items())}}
