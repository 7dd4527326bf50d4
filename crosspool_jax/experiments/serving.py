"""Serving a fleet from an ml_collections config under a request trace (the loop of the scripts).

`scripts/serve.py` serves one engine; `crosspool_jax.experiments.runner` serves the same trace
under each memory organisation. The config has the blocks `fleet`, `engine`, `workload`,
`sampling` and the loop's fields (see `configs/serve/demo.py`). Invariant: under the arrival
modes "logical" and "all_at_once" the schedule, and every count derived from it, is a function
of trace and seed only; latencies are always wall-clock. The blocks and arrival modes:
WORKSPACE.md, "Experiments". `Profile`: a jax.profiler trace of a few served steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from crosspool_jax.capacity.references import REFERENCE_HF_CONFIGS, reference_config
from crosspool_jax.engine import Engine, EngineConfig, Status
from crosspool_jax.engine.metrics import percentiles
from crosspool_jax.models.checkpoint import load_checkpoint, read_model_config
from crosspool_jax.models.config import MODEL_FAMILIES, tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.models.sampling import SamplingParams
from crosspool_jax.workloads import (
  Burst,
  LengthDist,
  WorkloadConfig,
  draw_bursts,
  generate_trace,
  prompt_ids,
  read_jsonl,
  read_meta,
)

ARRIVAL_MODES = ("trace", "logical", "all_at_once")


def _err(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# --- building the fleet, the engine and the trace -----------------------------------------


def engine_config(block) -> EngineConfig:
  """`EngineConfig` from a config's `engine` block (fields it lacks keep their defaults)."""
  kwargs = {}
  for field in dataclasses.fields(EngineConfig):
    if field.name in block:
      value = block[field.name]
      kwargs[field.name] = tuple(int(v) for v in value) if isinstance(value, tuple | list) \
          else value
  unknown = sorted(set(block.keys()) - {f.name for f in dataclasses.fields(EngineConfig)})
  if unknown:
    raise ValueError(f"config.engine has fields EngineConfig does not know: {unknown}")
  return EngineConfig(**kwargs)


def fleet_model_config(entry):
  """The ModelConfig of a fleet entry without loading weights (a checkpoint's config.json, a
  reference shape's public config)."""
  if entry.get("reference"):
    return reference_config(entry.reference)
  if entry.checkpoint:
    return read_model_config(entry.checkpoint)
  return tiny_config(entry.family, **_overrides(entry))


def no_weights_error(model_id: str, entry) -> ValueError:
  """The error for serving a reference-shape entry, which has no weights to serve."""
  return ValueError(f"config.fleet.{model_id}.reference={entry.reference!r} is a public shape "
                    "with no weights: simulate it (--config.mode=sim), or give a checkpoint "
                    f"(--config.fleet.{model_id}.checkpoint=DIR, and unset its reference)")


def _overrides(entry) -> dict:
  raw = entry.get("overrides") or {}
  raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def load_fleet_model(entry):
  """(ModelConfig, params) of a fleet entry: its checkpoint, or a seeded tiny model."""
  dtype = jnp.dtype(entry.dtype)
  if entry.checkpoint:
    return load_checkpoint(entry.checkpoint, dtype=dtype)
  cfg = tiny_config(entry.family, **_overrides(entry))
  return cfg, init_params(cfg, seed=entry.seed, dtype=dtype)


def build_engine(config, log=_err, backend=None):
  """Registers the config's fleet in an Engine and starts it.

  Args:
    config: the serving config (`fleet`, `engine` blocks).
    log: where engine start-up messages go.
    backend: the engine's `Backend` (None: this process's devices).

  Returns:
    (engine, {model_id: ModelConfig}).
  """
  engine = Engine(engine_config(config.engine), log=log, backend=backend)
  cfgs = {}
  for model_id, m in config.fleet.items():
    if m.get("reference"):
      raise no_weights_error(model_id, m)
    cfg, params = load_fleet_model(m)
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


@dataclasses.dataclass(frozen=True)
class Profile:
  """A `jax.profiler` trace of `steps` engine steps after the first `warmup` served ones.

  Written under `dir` (plugins/profile/<time>/: an .xplane.pb for TensorBoard / XProf and a
  perfetto_trace.json.gz for ui.perfetto.dev).
  """

  dir: str
  steps: int = 5
  warmup: int = 2

  def __post_init__(self):
    if self.steps < 1 or self.warmup < 0:
      raise ValueError(f"profile: steps must be >= 1 and warmup >= 0, got {self.steps}, "
                       f"{self.warmup}")


def check_config(config) -> None:
  """Rejects bad loop settings before anything is compiled (ValueError naming the field)."""
  if config.arrival_mode not in ARRIVAL_MODES:
    raise ValueError(f"config.arrival_mode must be one of {ARRIVAL_MODES}, got "
                     f"{config.arrival_mode!r}")
  for name in ("replay_speed", "logical_step_s", "max_wall_s", "progress_interval_s"):
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
    reference = m.get("reference")
    if reference and m.checkpoint:
      raise ValueError(f"config.fleet.{model_id}: set its checkpoint or its reference, not both")
    if reference and reference not in REFERENCE_HF_CONFIGS:
      raise ValueError(f"config.fleet.{model_id}.reference must be one of "
                       f"{sorted(REFERENCE_HF_CONFIGS)}, got {reference!r}")
    if not m.checkpoint and not reference and m.family not in MODEL_FAMILIES:
      raise ValueError(f"config.fleet.{model_id}.family must be one of {MODEL_FAMILIES} (or set "
                       f"its checkpoint or reference), got {m.family!r}")


def check_replicated(config) -> None:
  """Rejects a loop whose schedule follows the wall clock, for a loop every process of a
  multi-process run runs alike (their schedules would differ, and so would their replicated
  host state): ValueError naming the field."""
  if config.arrival_mode == "trace":
    raise ValueError("config.arrival_mode='trace' submits requests by the wall clock, which "
                     "differs between the processes of a multi-process run (their replicated "
                     "schedulers would diverge): use 'logical' or 'all_at_once'")


def never_fits(engine, record, cfg, max_context: int) -> str | None:
  """Why the record's full context can never be held by its model's KV pool, or None (also
  for a context beyond the model's `max_context`: the engine says so itself)."""
  pool = engine.kv_pool(record.model_id)
  tokens = record.prompt_len + record.max_new_tokens
  if tokens > min(max_context, cfg.max_context):
    return None
  need = cfg.num_layers * math.ceil(tokens / pool.page_tokens(record.model_id))
  if need > pool.limit:
    return (f"context of {tokens} tokens needs {need} KV pages, more than the pool's "
            f"{pool.limit} usable KV pages ({pool.num_devices} KV device(s) x "
            f"{pool.pages_per_device - 1} per device, null pages excluded)")
  return None


class Progress:
  """One stderr line every `interval_s`: steps, done/total, tokens/s, KV use, preemptions.

  KV use is of the usable pages of every pool (each device's null page excluded), the count the
  results' `kv_capacity_pages` and the rejection messages give.
  """

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
         f" (rejected {self.rejected}) | {rate:7.1f} tok/s | KV {used} of {limit} usable pages "
         f"({100 * used / max(1, limit):.0f}%) | preemptions {pre}")
    self.last, self.tokens_at_last = now, self.tokens


class _Tracer:
  """Starts and stops the profiler trace of a `Profile` around the engine steps."""

  def __init__(self, profile: Profile | None):
    self.profile, self.served, self.traced, self.open = profile, 0, 0, False

  def before_step(self) -> None:
    p = self.profile
    if p is not None and not self.open and not self.traced and self.served == p.warmup:
      os.makedirs(p.dir, exist_ok=True)
      jax.profiler.start_trace(p.dir, create_perfetto_trace=True)
      self.open = True

  def after_step(self) -> None:
    self.served += 1
    if self.open:
      self.traced += 1
      if self.traced >= self.profile.steps:
        self.stop()

  def stop(self) -> None:
    if self.open:
      jax.profiler.stop_trace()
      self.open = False

  def summary(self) -> dict:
    """Where the trace went and how many steps it holds (0: the run served <= warmup)."""
    return {"dir": self.profile.dir, "steps": self.traced, "warmup": self.profile.warmup}


def describe_profile(summary: dict) -> str:
  """One line saying where a run's profiler trace went (`serve`'s "profile" entry)."""
  if not summary["steps"]:
    return (f"no profiler trace: the run served no step after its {summary['warmup']} "
            f"warm-up steps")
  return (f"profiler trace of {summary['steps']} steps (after {summary['warmup']} warm-up "
          f"steps) in {summary['dir']} (TensorBoard/XProf: --logdir={summary['dir']}; "
          f"Perfetto: plugins/profile/*/perfetto_trace.json.gz)")


def serve(engine, cfgs, config, records, *, profile: Profile | None = None,
          replicated: bool = False) -> dict:
  """Submits the records on their schedule and steps the engine until all are done.

  Args:
    engine: a started Engine serving the fleet.
    cfgs: model_id -> ModelConfig (vocab sizes, layers).
    config: the serving config (sampling, arrival_mode, replay_speed, max_wall_s, ...).
    records: the trace, sorted by arrival_s.
    profile: if given, a jax.profiler trace of some of the steps (`Profile`).
    replicated: every process of a multi-process run runs this loop alike, so nothing may
      follow the wall clock: arrival_mode "trace" is refused and config.max_wall_s is not
      applied (the launcher's --timeout_s bounds the run).

  Returns:
    The "serve" section of metrics.json: request ids, rejections, outputs, submit lag, times
    (and `profile`: where the trace was written and how many steps it holds).
  """
  check_config(config)
  if replicated:
    check_replicated(config)
  s = config.sampling
  ids = [f"r{i:05d}" for i in range(len(records))]
  rejected: dict[str, dict] = {}
  submitted: dict[str, float] = {}  # request id -> submit lag (s)
  cancelled_at_timeout: list[str] = []
  progress = Progress(engine, len(records), config.progress_interval_s)
  mode = config.arrival_mode
  next_i = 0
  logical = 0.0  # the logical clock (trace seconds), arrival_mode="logical"
  tracer = _Tracer(profile)
  t0 = time.perf_counter()

  def clock() -> float:
    """Now, in trace seconds."""
    if mode == "logical":
      return logical
    return (time.perf_counter() - t0) * config.replay_speed

  def arrived(i: int) -> bool:
    return mode == "all_at_once" or records[i].arrival_s <= clock()

  def reject(i: int, reason: str) -> None:
    r = records[i]
    rejected[ids[i]] = {"request_id": ids[i], "model_id": r.model_id, "arrival_s": r.arrival_s,
                        "prompt_len": r.prompt_len, "max_new_tokens": r.max_new_tokens,
                        "reason": reason}
    progress.rejected += 1
    progress.done += 1
    _err(f"rejected {ids[i]} (model {r.model_id!r}): {reason}")

  try:
    while True:
      while next_i < len(records) and arrived(next_i):
        i, r = next_i, records[next_i]
        next_i += 1
        try:
          fleet = config.fleet.get(r.model_id)
          why = (None if fleet is None or r.model_id not in cfgs  # the engine names unknown ids
                 else never_fits(engine, r, cfgs[r.model_id], fleet.max_context))
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
          submitted[ids[i]] = (0.0 if mode != "trace" else
                               time.perf_counter() - t0 - r.arrival_s / config.replay_speed)
        except ValueError as e:  # the engine changes nothing on a bad request
          reject(i, str(e))
      if engine.scheduler.has_work():
        tracer.before_step()
        events = engine.step()
        tracer.after_step()
        for ev in events:
          progress.tokens += ev.token is not None
          progress.done += ev.finished
        logical += config.logical_step_s
      elif next_i < len(records):
        if mode == "logical":  # idle: jump to the next arrival
          logical = max(logical, records[next_i].arrival_s)
        else:
          wait = (records[next_i].arrival_s - clock()) / config.replay_speed
          time.sleep(min(max(wait, 0.0), config.progress_interval_s))
      else:
        break
      if not replicated and time.perf_counter() - t0 > config.max_wall_s:
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
  finally:
    tracer.stop()
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
  } | ({} if profile is None else {"profile": tracer.summary()})


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
    lines.append(f"KV pool {g} ({p['policy']}): {p['capacity_pages']} usable KV pages (null "
                 f"pages excluded) of {p['page_elems']} elems, peak "
                 f"{100 * p['peak_utilization']:.1f}%, mean {100 * p['mean_utilization']:.1f}%, "
                 f"preemptions {p['preemptions']}, used at end {p['used_pages_now']}")
  lines.append(f"steps {metrics['steps']}, executables {metrics['compile_count']} (compiled at "
               f"start {metrics['compile_count_at_start']}), XLA compilations after start "
               f"{metrics['backend_compiles_since_start']}")
  lines.append(f"{serve_m['output_tokens']} tokens in {serve_m['serve_wall_s']:.1f}s "
               f"({serve_m['output_tokens_per_s']:.1f} tok/s); submit lag p99 "
               f"{_ms(serve_m['submit_lag_s'], 'p99')} ms; start-up (load + compile) "
               f"{serve_m['startup_s']:.1f}s")
  return "\n".join(lines)
