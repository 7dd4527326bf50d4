r"""Serves a fleet of MoE models from a config under a replayed or generated request trace.

  python scripts/serve.py --config=configs/serve/demo.py --config.engine.kv_policy=static \
      --workdir=/tmp/serve
  python scripts/serve.py --config=configs/serve/demo.py:runlocal --workdir=/tmp/serve_small
  # replay a trace (JSONL, e.g. the trace.jsonl a previous run wrote), as fast as possible:
  python scripts/serve.py --config=configs/serve/demo.py --config.workload.trace=T.jsonl \
      --config.arrival_mode=all_at_once --workdir=/tmp/serve_replay

The config (see configs/serve/demo.py) holds the fleet, the engine block (EngineConfig's
fields), the workload (crosspool_jax.workloads.WorkloadConfig's fields, or a trace file), the
sampling params and the loop settings. After start-up (KV buffers, compilation of every
bucket) the clock starts: a request is submitted once its arrival time has come (arrival_s /
replay_speed), or all at once (arrival_mode=all_at_once), and the engine steps until every
request is done. A request the engine cannot take (unknown model, prompt beyond the model's
context, a context that can never fit its KV pool) is reported and skipped.

Live progress goes to stderr about once a second; the metrics table to stdout at the end.
Writes to --workdir:
  metrics.json: the engine's metrics() (summary, per-request rows, pools, compile counts),
    "serve" (rejections, every request's output tokens, submit lag, wall times, trace
    stats), the full config and the git revision;
  trace.jsonl: the trace that was served (replayable with --config.workload.trace).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from crosspool_jax.cli import start_script
from crosspool_jax.engine import Engine, EngineConfig, Status
from crosspool_jax.engine.metrics import percentiles
from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import FAMILIES, tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.models.sampling import SamplingParams
from crosspool_jax.provenance import git_dirty, git_revision
from crosspool_jax.workloads import (
  Burst,
  LengthDist,
  WorkloadConfig,
  draw_bursts,
  generate_trace,
  prompt_ids,
  read_jsonl,
  read_meta,
  trace_stats,
  write_jsonl,
)

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "serve", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "Serving config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created).", required=True)

ARRIVAL_MODES = ("trace", "all_at_once")


def _err(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# --- building the fleet, the engine and the trace -----------------------------------------


def build_engine(config, log=_err):
  """Registers the config's fleet in an Engine and starts it.

  Args:
    config: the serving config (`fleet`, `engine` blocks).
    log: where engine start-up messages go.

  Returns:
    (engine, {model_id: ModelConfig}).
  """
  e = config.engine
  engine = Engine(EngineConfig(
      kv_policy=e.kv_policy, page_elems=e.page_elems, pages_per_device=e.pages_per_device,
      kv_dtype=e.kv_dtype, token_budget=e.token_budget,
      token_buckets=tuple(int(b) for b in e.token_buckets), max_batch=e.max_batch,
      attn_impl=e.attn_impl, moe_impl=e.moe_impl, devices=tuple(int(d) for d in e.devices),
      weight_devices=tuple(int(d) for d in e.weight_devices), micro_batches=e.micro_batches,
      expert_slots_per_device=e.expert_slots_per_device, expert_policy=e.expert_policy),
      log=log)
  cfgs = {}
  for model_id, m in config.fleet.items():
    dtype = jnp.dtype(m.dtype)
    if m.checkpoint:
      cfg, params = load_checkpoint(m.checkpoint, dtype=dtype)
    else:
      cfg = tiny_config(m.family)
      params = init_params(cfg, seed=m.seed, dtype=dtype)
    engine.register_model(model_id, cfg=cfg, params=params, max_batch=m.max_batch,
                          max_context=m.max_context, group=m.group)
    cfgs[model_id] = cfg
  engine.start()
  return engine, cfgs


def _length_dist(block):
  return LengthDist(**block.to_dict())


def _bursts(spec) -> tuple[Burst, ...]:
  """config.workload.bursts: ((model ids, start_s, duration_s, factor), ...) -> Bursts."""
  out = []
  for b in spec:
    if not (isinstance(b, tuple | list) and len(b) == 4):
      raise ValueError("config.workload.bursts entries must be (model ids, start_s, duration_s, "
                       f"factor), got {b!r}")
    models = (b[0],) if isinstance(b[0], str) else tuple(b[0])
    out.append(Burst(models=models, start_s=float(b[1]), duration_s=float(b[2]),
                     factor=float(b[3])))
  return tuple(out)


def workload_config(config):
  """The `WorkloadConfig` of the config's workload block (popularity: fleet order if empty)."""
  w = config.workload
  order = [m.strip() for m in w.popularity.split(",") if m.strip()] or list(config.fleet.keys())
  return WorkloadConfig(
      model_ids=tuple(order), num_requests=w.num_requests, total_rate=w.total_rate, cv=w.cv,
      zipf_exponent=w.zipf_exponent, prompt_len=_length_dist(w.prompt_len),
      output_len=_length_dist(w.output_len), bursts=_bursts(w.bursts),
      random_bursts=w.random_bursts,
      burst_group_size=w.burst_group_size, burst_duration_s=w.burst_duration_s,
      burst_factor=w.burst_factor, seed=w.seed)


def load_trace(config):
  """(records sorted by arrival, meta): the replayed file or a freshly generated trace."""
  if config.workload.trace:
    try:
      records = read_jsonl(config.workload.trace)
    except (ValueError, OSError) as e:
      raise type(e)(f"config.workload.trace: {e}") from e
    meta = {"replayed_from": os.path.basename(config.workload.trace),
            "meta": read_meta(config.workload.trace)}
  else:
    try:
      wc = workload_config(config)
    except ValueError as e:
      raise ValueError(f"config.workload: {e}") from e
    records = generate_trace(wc)
    meta = {"workload": dataclasses.asdict(wc),
            "bursts": [dataclasses.asdict(b) for b in draw_bursts(wc)]}
  return sorted(records, key=lambda r: r.arrival_s), meta


# --- the serving loop ----------------------------------------------------------------------


def check_config(config) -> None:
  """Rejects bad loop settings before anything is compiled (ValueError naming the field)."""
  if config.arrival_mode not in ARRIVAL_MODES:
    raise ValueError(f"config.arrival_mode must be one of {ARRIVAL_MODES}, got "
                     f"{config.arrival_mode!r}")
  for name in ("replay_speed", "max_wall_s", "progress_interval_s"):
    value = config[name]
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
      raise ValueError(f"config.{name} must be a finite number > 0, got {value!r}")
  try:
    SamplingParams(temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                   top_p=config.sampling.top_p)
  except ValueError as e:
    raise ValueError(f"config.sampling: {e}") from e
  if not config.fleet:
    raise ValueError("config.fleet is empty: add at least one model")
  unknown = [m.strip() for m in config.workload.popularity.split(",")
             if m.strip() and m.strip() not in config.fleet]
  if unknown and not config.workload.trace:
    raise ValueError(f"config.workload.popularity names models not in config.fleet: {unknown}")
  for model_id, m in config.fleet.items():
    if not m.checkpoint and m.family not in FAMILIES:
      raise ValueError(f"config.fleet.{model_id}.family must be one of {FAMILIES} (or set its "
                       f"checkpoint), got {m.family!r}")


def _never_fits(engine, cfgs, config, record) -> str | None:
  """Why the record's full context can never be held by its KV pool, or None."""
  fleet = config.fleet.get(record.model_id)
  if fleet is None or record.model_id not in cfgs:
    return None  # the engine names unknown models itself
  pool = engine.pools[fleet.group]
  tokens = record.prompt_len + record.max_new_tokens
  if tokens > min(fleet.max_context, cfgs[record.model_id].max_context):
    return None  # beyond the model's context: the engine says so itself
  need = cfgs[record.model_id].num_layers * math.ceil(tokens / pool.page_tokens(record.model_id))
  if need > pool.limit:
    return (f"context of {tokens} tokens needs {need} KV pages, more than the pool's "
            f"{pool.limit}")
  return None


class Progress:
  """One stderr line every `interval_s`: steps, done/total, tokens/s, KV use, preemptions."""

  def __init__(self, engine, total: int, interval_s: float):
    self.engine, self.total, self.interval_s = engine, total, interval_s
    self.t0 = self.last = time.perf_counter()
    self.tokens = self.tokens_at_last = 0
    self.done = self.rejected = 0

  def maybe_print(self, *, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.interval_s:
      return
    rate = (self.tokens - self.tokens_at_last) / max(now - self.last, 1e-9)
    used = sum(p.used_pages for p in self.engine.pools.values())
    limit = sum(p.limit for p in self.engine.pools.values())
    pre = sum(p.preemptions for p in self.engine.pools.values())
    _err(f"[{now - self.t0:7.1f}s] steps {self.engine.steps:6d} | done {self.done}/{self.total}"
         f" (rejected {self.rejected}) | {rate:7.1f} tok/s | KV {used}/{limit} pages "
         f"({100 * used / max(1, limit):.0f}%) | preemptions {pre}")
    self.last, self.tokens_at_last = now, self.tokens


def serve(engine, cfgs, config, records) -> dict:
  """Submits the records on their schedule and steps the engine until all are done.

  Args:
    engine: a started Engine serving the fleet.
    cfgs: model_id -> ModelConfig (vocab sizes, layers).
    config: the serving config (sampling, arrival_mode, replay_speed, max_wall_s, ...).
    records: the trace, sorted by arrival_s.

  Returns:
    The "serve" section of metrics.json: request ids, rejections, outputs, submit lag, times.
  """
  check_config(config)
  s = config.sampling
  ids = [f"r{i:05d}" for i in range(len(records))]
  rejected: dict[str, dict] = {}
  submitted: dict[str, float] = {}  # request id -> submit lag (s)
  cancelled_at_timeout: list[str] = []
  progress = Progress(engine, len(records), config.progress_interval_s)
  at_once = config.arrival_mode == "all_at_once"
  next_i = 0
  t0 = time.perf_counter()

  def reject(i: int, reason: str) -> None:
    r = records[i]
    rejected[ids[i]] = {"request_id": ids[i], "model_id": r.model_id, "arrival_s": r.arrival_s,
                        "prompt_len": r.prompt_len, "max_new_tokens": r.max_new_tokens,
                        "reason": reason}
    progress.rejected += 1
    progress.done += 1
    _err(f"rejected {ids[i]} (model {r.model_id!r}): {reason}")

  while True:
    now = time.perf_counter() - t0
    while next_i < len(records) and (at_once
                                     or records[next_i].arrival_s / config.replay_speed <= now):
      i, r = next_i, records[next_i]
      next_i += 1
      try:
        why = _never_fits(engine, cfgs, config, r)
        if why:
          raise ValueError(why)
        vocab = cfgs[r.model_id].vocab_size if r.model_id in cfgs else 1
        eos = cfgs[r.model_id].eos_token_id if r.model_id in cfgs else None
        stop = (eos if isinstance(eos, tuple) else (eos,)) if (config.stop_at_eos
                                                                and eos is not None) else ()
        engine.submit(model_id=r.model_id,
                      prompt_ids=prompt_ids(r, vocab, low=min(config.workload.prompt_low,
                                                              vocab - 1)),
                      max_new_tokens=r.max_new_tokens, stop_ids=stop, request_id=ids[i],
                      sampling=SamplingParams(temperature=s.temperature, top_k=s.top_k,
                                              top_p=s.top_p, seed=r.seed))
        submitted[ids[i]] = (0.0 if at_once else
                             time.perf_counter() - t0 - r.arrival_s / config.replay_speed)
      except ValueError as e:  # the engine changes nothing on a bad request
        reject(i, str(e))
    if engine.scheduler.has_work():
      for ev in engine.step():
        progress.tokens += ev.token is not None
        progress.done += ev.finished
    elif next_i < len(records):
      wait = records[next_i].arrival_s / config.replay_speed - (time.perf_counter() - t0)
      time.sleep(min(max(wait, 0.0), config.progress_interval_s))
    else:
      break
    if time.perf_counter() - t0 > config.max_wall_s:
      for rid in submitted:
        if engine.status(rid) not in (Status.FINISHED, Status.CANCELLED):
          engine.cancel(rid)
          cancelled_at_timeout.append(rid)
      for i in range(next_i, len(records)):
        reject(i, f"not submitted: config.max_wall_s={config.max_wall_s} reached")
      _err(f"max_wall_s={config.max_wall_s} reached: cancelled {len(cancelled_at_timeout)} "
           f"running/waiting requests, skipped {len(records) - next_i} not yet arrived")
      break
    progress.maybe_print()
  serve_s = time.perf_counter() - t0
  progress.maybe_print(force=True)
  outputs = {rid: engine.output(rid) for rid in submitted}
  return {
      "request_ids": ids,
      "submitted": len(submitted),
      "rejected": list(rejected.values()),
      "cancelled_at_timeout": cancelled_at_timeout,
      "outputs": outputs,
      "submit_lag_s": percentiles(list(submitted.values())),
      "serve_wall_s": serve_s,
      "output_tokens": sum(len(o) for o in outputs.values()),
      "output_tokens_per_s": sum(len(o) for o in outputs.values()) / max(serve_s, 1e-9),
  }


# --- reporting -----------------------------------------------------------------------------


def _ms(p: dict, key: str) -> str:
  return "-" if p[key] is None else f"{1000 * p[key]:.0f}"


def format_table(metrics: dict) -> str:
  """The end-of-run table: per model and overall latencies, then pools and compile counts."""
  summary, serve_m = metrics["summary"], metrics["serve"]
  rejected: dict[str, int] = {}
  for r in serve_m["rejected"]:
    rejected[r["model_id"]] = rejected.get(r["model_id"], 0) + 1
  head = (f"{'model':<14}{'req':>5}{'done':>5}{'rej':>5}{'pre':>5}  "
          f"{'TTFT ms p50/p90/p99':>22}  {'TBT ms p50/p90/p99':>20}  {'E2E ms p50/p90/p99':>22}")
  lines = [head, "-" * len(head)]
  rows = list(summary["per_model"].items())
  for model_id in sorted(set(rejected) - set(summary["per_model"])):
    rows.append((model_id, None))  # only rejected (e.g. an unknown model)
  rows.append(("overall", summary["overall"]))
  for model_id, s in rows:
    rej = sum(rejected.values()) if model_id == "overall" else rejected.get(model_id, 0)
    if s is None:
      lines.append(f"{model_id:<14}{rej:>5}{0:>5}{rej:>5}{0:>5}")
      continue
    lat = ["/".join(_ms(s[k], p) for p in ("p50", "p90", "p99"))
           for k in ("ttft_s", "tbt_s", "e2e_s")]
    lines.append(f"{model_id:<14}{s['requests'] + rej:>5}{s['finished']:>5}{rej:>5}"
                 f"{s['preemptions']:>5}  {lat[0]:>22}  {lat[1]:>20}  {lat[2]:>22}")
  lines.append("")
  for g, p in metrics["pools"].items():
    lines.append(f"KV pool {g} ({p['policy']}): {p['capacity_pages']} pages of "
                 f"{p['page_elems']} elems, peak {100 * p['peak_utilization']:.1f}%, mean "
                 f"{100 * p['mean_utilization']:.1f}%, preemptions {p['preemptions']}, "
                 f"used at end {p['used_pages_now']}")
  lines.append(f"steps {metrics['steps']}, executables {metrics['compile_count']} (compiled at "
               f"start {metrics['compile_count_at_start']}), XLA compilations after start "
               f"{metrics['backend_compiles_since_start']}")
  lines.append(f"{serve_m['output_tokens']} tokens in {serve_m['serve_wall_s']:.1f}s "
               f"({serve_m['output_tokens_per_s']:.1f} tok/s); submit lag p99 "
               f"{_ms(serve_m['submit_lag_s'], 'p99')} ms; start-up (load + compile) "
               f"{serve_m['startup_s']:.1f}s")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  config = _CONFIG.value
  if config.num_cpu_devices:  # before any JAX computation
    jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
  try:  # bad settings and trace files fail before anything is compiled
    check_config(config)
    records, trace_meta = load_trace(config)
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from e
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  write_jsonl(os.path.join(workdir, "trace.jsonl"), records, meta=trace_meta)
  _err(f"trace: {len(records)} requests over {records[-1].arrival_s if records else 0:.1f}s "
       f"(x{1 / config.replay_speed:g} wall), models {trace_stats(records).get('per_model')}")

  start = time.perf_counter()
  engine, cfgs = build_engine(config)
  startup_s = time.perf_counter() - start
  _err(f"engine started in {startup_s:.1f}s ({engine.config.kv_policy} KV policy, "
       f"{jax.devices()[0].platform})")

  serve_m = serve(engine, cfgs, config, records)
  serve_m["startup_s"] = startup_s
  serve_m["trace"] = trace_stats(records)
  serve_m["trace_meta"] = trace_meta
  metrics = engine.metrics() | {
      "serve": serve_m,
      "serve_config": json.loads(config.to_json_best_effort()),
      "git_revision": git_revision(),
      "git_dirty": git_dirty(),
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "device": {"platform": jax.devices()[0].platform,
                 "device_kind": jax.devices()[0].device_kind},
  }
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  print(format_table(metrics))
  _err(f"wrote {os.path.join(workdir, 'metrics.json')}")


if __name__ == "__main__":
  app.run(main)
