"""Synthetic and replayed request traces for a cold multi-model fleet (numpy only)."""

from crosspool_jax.workloads.generator import (
  LENGTH_KINDS,
  Burst,
  LengthDist,
  WorkloadConfig,
  draw_bursts,
  gamma_gaps,
  generate_trace,
  model_arrivals,
  trace_stats,
  zipf_shares,
)
from crosspool_jax.workloads.trace import (
  TraceFormatError,
  TraceRecord,
  prompt_ids,
  read_jsonl,
  read_meta,
  write_jsonl,
)

__all__ = [
  "LENGTH_KINDS",
  "Burst",
  "LengthDist",
  "TraceFormatError",
  "TraceRecord",
  "WorkloadConfig",
  "draw_bursts",
  "gamma_gaps",
  "generate_trace",
  "model_arrivals",
  "prompt_ids",
  "read_jsonl",
  "read_meta",
  "trace_stats",
  "write_jsonl",
  "zipf_shares",
]
