"""One trace, every memory organisation: the experiment behind `scripts/run_experiment.py`.

An experiment config is a serving config (`experiments/serving.py`) plus the blocks `budget`,
`policies`, `sweep` and `slo`; `run_experiment` serves one trace per sweep point under each run
of `policies`, every run from the same per-device byte budget, and returns the results dict
(results.json). Invariant: a run's `counts` block is a function of config and seed (arrival
modes "logical" and "all_at_once"); what the wall clock measures is in its `wall_clock` block,
which `without_wall_clock` drops, with `pipeline_step` (the executor timeline's median step,
drawn as pipeline.png). The blocks and fields: WORKSPACE.md, "Configs and results".
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np

from crosspool_jax.engine.policies import POLICIES
from crosspool_jax.engine.policies.sizes import dtype_itemsize
from crosspool_jax.experiments import budget as budget_lib
from crosspool_jax.experiments.serving import (
  Profile,
  build_engine,
  check_config,
  describe_profile,
  engine_config,
  fleet_model_config,
  load_trace,
  no_weights_error,
  serve,
)
from crosspool_jax.train.fleet import read_fleet
from crosspool_jax.workloads import trace_stats, write_jsonl

WALL_CLOCK_KEYS = ("wall_clock", "created")
# per-sample and per-step arrays: what the plots draw, not what the tables read
SAMPLE_KEYS = ("ttft_samples_s", "tbt_samples_s", "kv_used_pages_per_step",
               "kv_pool_timeline_t_s", "arrivals")


def run_names(config) -> list[str]:
  """The runs of `config.policies` in the order they are served and reported.

  By policy in the registry's order (the baselines first: static, shared, then the crosspool
  runs), by name within a policy: the order the comparison is read in.
  """
  order = list(POLICIES)

  def policy(name):
    return config.policies[name].get("kv_policy", config.engine.kv_policy)

  return sorted(config.policies, key=lambda n: (order.index(policy(n))
                                                if policy(n) in order else len(order), n))


def without_wall_clock(results: dict) -> dict:
  """The results without their wall-clock fields (what two runs of one seed must agree on)."""
  return _without(results, WALL_CLOCK_KEYS)


def _without(results: dict, keys: tuple[str, ...]) -> dict:
  def strip(x):
    if isinstance(x, dict):
      return {k: strip(v) for k, v in x.items() if k not in keys}
    if isinstance(x, list):
      return [strip(v) for v in x]
    return x
  return strip(results)


def without_samples(results: dict) -> dict:
  """The results without their per-sample and per-step arrays (`SAMPLE_KEYS`): every table
  and BENCHMARKS.md section reads the same from it, in a file small enough to commit."""
  return _without(results, SAMPLE_KEYS)


def _set_path(config, path: str, value) -> None:
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise ValueError(f"config.sweep.field={path!r}: no config.{p}")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"config.sweep.field={path!r}: no such field")
  node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value


MODES = ("run", "sim")
# budget fields a run of config.policies may set for itself, next to its engine overrides:
# a weights device's own bytes (an ablation that needs a bigger weights pool), the KV planner
RUN_BUDGET_FIELDS = ("weights_device_bytes", "kv_planner")


def expand_fleet(config) -> None:
  """Applies config.fleet_size, then config.fleet_dir, to a resolved, unlocked config.

  fleet_size > 0 repeats the fleet's entries in order until it has that many models (copy
  k >= 1 of `<id>` is `<id>_c<k>`: a fine-tune of the same shape); 0 leaves the fleet as
  listed. A fleet_dir (a trained fleet, `scripts/make_fleet.py`) gives each entry with neither
  a checkpoint nor a reference the next unused model of its family there, in fleet.json's
  order (its base, then its fine-tunes).
  """
  size = config.get("fleet_size", 0)
  if not isinstance(size, int) or size < 0:
    raise ValueError(f"config.fleet_size must be an integer >= 0, got {size!r}")
  if size:
    _repeat_fleet(config, size)
  if config.get("fleet_dir"):
    _use_fleet_dir(config, config.fleet_dir)


def _use_fleet_dir(config, fleet_dir: str) -> None:
  models = read_fleet(fleet_dir)["models"]
  used: dict[str, int] = {}
  for model_id, entry in config.fleet.items():
    if entry.get("checkpoint") or entry.get("reference"):
      continue
    of_family = [m for m in models if m["family"] == entry.family]
    k = used.get(entry.family, 0)
    used[entry.family] = k + 1
    if k >= len(of_family):
      raise ValueError(f"config.fleet_dir {fleet_dir} holds {len(of_family)} {entry.family} "
                       f"model(s); config.fleet.{model_id} would be number {k + 1}")
    entry.checkpoint = of_family[k]["dir"]


def _repeat_fleet(config, size: int) -> None:
  entries = list(config.fleet.items())
  fleet = ml_collections.ConfigDict()
  for i in range(size):
    model_id, entry = entries[i % len(entries)]
    k = i // len(entries)
    fleet[model_id if k == 0 else f"{model_id}_c{k}"] = copy.deepcopy(entry)
  config.fleet = fleet


def check_experiment(config) -> None:
  """Rejects a bad experiment config before anything is compiled (ValueError naming the field).

  The fleet, loop and engine fields are checked at the first sweep point. In mode "run" a
  budget that cannot hold the fleet is an error, and so is a reference shape (no weights); in
  mode "sim" such a plan is a result (the run is recorded as refused).
  """
  mode = config.get("mode", "run")
  if mode not in MODES:
    raise ValueError(f"config.mode must be one of {MODES}, got {mode!r}")
  if not config.policies:
    raise ValueError("config.policies is empty: name at least one run")
  known = set(config.engine.keys()) | set(RUN_BUDGET_FIELDS)
  for name, overrides in config.policies.items():
    unknown = sorted(set(overrides.keys()) - known)
    if unknown:
      raise ValueError(f"config.policies.{name} overrides unknown engine fields {unknown}")
  for key in ("device_bytes", "device_gib"):
    if config.budget.get(key, 0) < 0:
      raise ValueError(f"config.budget.{key} must be >= 0, got {config.budget[key]}")
  probe = config.copy_and_resolve_references()
  probe.unlock()
  if config.sweep.field:
    if not config.sweep.points:
      raise ValueError("config.sweep.points is empty but config.sweep.field is set")
    _set_path(probe, config.sweep.field, config.sweep.points[0])
  expand_fleet(probe)
  check_config(probe)
  if mode == "run":
    for model_id, entry in probe.fleet.items():
      if entry.get("reference"):
        raise no_weights_error(model_id, entry)
  if config.get("require_checkpoints") and mode == "run":
    missing = [m for m, e in probe.fleet.items() if not e.checkpoint]
    if missing:
      raise ValueError(f"the {config.variant} variant serves real checkpoints: set "
                       + " ".join(f"--config.fleet.{m}.checkpoint=DIR" for m in missing))
  for key in ("ttft_s", "tbt_s"):
    if not config.slo[key] > 0:
      raise ValueError(f"config.slo.{key} must be > 0, got {config.slo[key]}")
  for name in config.policies:  # every engine config and plan, before the first run compiles
    try:
      engine_config(run_config(probe, name, check=mode == "run")[0].engine)
    except ValueError as e:
      raise ValueError(f"config.policies.{name}: {e}") from e


def run_config(config, name: str, *, check: bool = True):
  """The serving config of run `name`: the policy's engine overrides (and its own
  `RUN_BUDGET_FIELDS`) and its budget plan.

  Args:
    config: the experiment config (its fleet as served: `expand_fleet` applied).
    name: a run of config.policies.
    check: raise if the plan cannot hold the fleet (else the caller asks
      `budget.refusal(plan)`; the fleet is then left as given).

  Returns:
    (config, Plan or None): a resolved, unlocked copy.
  """
  c = config.copy_and_resolve_references()
  c.unlock()
  overrides = config.policies[name].to_dict()
  weights_bytes = overrides.pop("weights_device_bytes", None)
  kv_planner = overrides.pop("kv_planner", c.budget.kv_planner)
  c.engine.update(overrides)
  c.engine.devices = tuple(c.engine.devices)
  c.engine.weight_devices = tuple(c.engine.weight_devices)
  device_bytes = budget_lib.device_bytes(c.budget)
  if not device_bytes:
    return c, None
  fleet = {m: budget_lib.FleetModel(fleet_model_config(e), e.dtype, e.max_batch, e.max_context)
           for m, e in c.fleet.items()}
  plan = budget_lib.plan_policy(
      fleet, policy=c.engine.kv_policy, kv_devices=len(c.engine.devices),
      weight_devices=len(c.engine.weight_devices), device_bytes=device_bytes,
      page_elems=c.engine.page_elems, kv_dtype=c.engine.kv_dtype,
      reserve_fraction=c.budget.reserve_fraction, weights_device_bytes=weights_bytes,
      kv_planner=kv_planner, check=check)
  if budget_lib.refusal(plan):
    return c, plan
  if c.engine.weight_devices:  # the planner may split the devices otherwise than given
    devices = (*c.engine.devices, *c.engine.weight_devices)
    kv = plan.accounting["kv_devices"]
    c.engine.devices, c.engine.weight_devices = devices[:kv], devices[kv:]
  c.engine.pages_per_device = plan.pages_per_device
  if plan.expert_slots_per_device is not None:
    c.engine.expert_slots_per_device = plan.expert_slots_per_device
  for m, e in c.fleet.items():
    e.group = plan.groups[m]
    e.max_context = plan.max_context[m]
  return c, plan


def _digest(outputs: dict) -> str:
  return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()


def _good(row: dict, slo) -> bool:
  if row["status"] != "finished" or row["ttft_s"] is None or row["ttft_s"] > slo.ttft_s:
    return False
  return not row["tbt_s"] or float(np.percentile(row["tbt_s"], 90)) <= slo.tbt_s


def summarize_run(metrics: dict, serve_m: dict, slo) -> dict:
  """The `counts` and `wall_clock` blocks of one run from the engine's metrics."""
  engine = metrics["config"]
  page_bytes = engine["page_elems"] * dtype_itemsize(engine["kv_dtype"])
  rows = metrics["requests"]
  done = [r for r in rows if r["status"] == "finished"]
  by_id = {r["request_id"]: r for r in rows}
  pool_used = [s["used_pages"] for s in metrics["pool_timeline"]]
  usable = sum(p["capacity_pages"] for p in metrics["pools"].values())  # null pages excluded
  steps = metrics["steps"]
  kv_used_per_step = (np.asarray(pool_used, np.int64).reshape(steps, -1).sum(1).tolist()
                      if steps else [])
  wp = metrics.get("weights_pool")
  counts = {
      "requests": len(serve_m["request_ids"]),
      "finished": len(done),
      "rejected": len(serve_m["rejected"]),
      "rejections": [{k: r[k] for k in ("request_id", "model_id", "reason")}
                     for r in serve_m["rejected"]],
      "cancelled_at_timeout": len(serve_m["cancelled_at_timeout"]),
      "preempted_requests": sum(r["preemptions"] > 0 for r in rows),
      "preemptions": sum(r["preemptions"] for r in rows),
      "steps": steps,
      "output_tokens": sum(r["output_tokens"] for r in rows),
      "kv_capacity_pages": usable,
      "kv_page_bytes": page_bytes,
      "kv_peak_pages": max(kv_used_per_step, default=0),
      "kv_peak_utilization": max(kv_used_per_step, default=0) / max(1, usable),
      "kv_mean_utilization": float(np.mean(kv_used_per_step)) / max(1, usable)
                             if kv_used_per_step else 0.0,
      "kv_used_pages_per_step": kv_used_per_step,
      "longest_context_served": max((by_id[r]["prompt_tokens"] + by_id[r]["output_tokens"]
                                     for r in by_id if by_id[r]["status"] == "finished"),
                                    default=0),
      "expert_hit_rate": None if wp is None else wp["hit_rate"],
      "expert_loads": None if wp is None else wp["loads"],
      "expert_bytes_swapped": None if wp is None else wp["bytes_swapped"],
      "expert_calls": metrics.get("expert_calls"),
      "compile_count": metrics["compile_count"],
      "backend_compiles_after_start": metrics["backend_compiles_since_start"],
      "outputs_sha256": _digest(serve_m["outputs"]),
  }
  good = [r for r in done if _good(r, slo)]
  wall = serve_m["serve_wall_s"]
  overall = metrics["summary"]["overall"]
  wall_clock = {
      "ttft_s": overall["ttft_s"], "tbt_s": overall["tbt_s"], "e2e_s": overall["e2e_s"],
      "queue_s": overall["queue_s"],
      "per_model": {m: {k: s[k] for k in ("ttft_s", "tbt_s", "e2e_s")}
                    for m, s in metrics["summary"]["per_model"].items()},
      "ttft_samples_s": [r["ttft_s"] for r in done if r["ttft_s"] is not None],
      "tbt_samples_s": [g for r in done for g in r["tbt_s"]],
      "output_tokens_per_s": serve_m["output_tokens"] / max(wall, 1e-9),
      "goodput_requests_per_s": len(good) / max(wall, 1e-9),
      "slo_attainment": len(good) / max(1, len(done)),
      "startup_s": serve_m["startup_s"],
      "serve_wall_s": wall,
      # steps with a prompt chunk and decode-only steps: their times and tokens generated
      "steps_by_kind": metrics["steps_by_kind"],
      "kv_pool_timeline_t_s": [s["t"] - metrics["pool_timeline"][0]["t"]
                               for s in metrics["pool_timeline"][::max(1, len(metrics["pools"]))]]
                              if metrics["pool_timeline"] else [],
  }
  if metrics.get("host"):  # the host's control cost: dispatches, transfers, reads, µs/token
    wall_clock["host"] = metrics["host"]
  if wp is not None:
    wall_clock["expert_swap_s"] = {k: wp[k] for k in wp if k.startswith("swap_s")}
  if "pipeline_overlap" in metrics:
    wall_clock["pipeline_overlap"] = metrics["pipeline_overlap"]
  return {"counts": counts, "wall_clock": wall_clock}


def _duration(events: list[dict]) -> float:
  return max(e["end"] for e in events) - min(e["start"] for e in events)


def pipeline_step(events: list[dict]) -> dict | None:
  """The representative step of an executor timeline, its events relative to its start.

  The recorded step whose duration (first stage issued to last output ready) is the median of
  the recorded steps' (the lower middle for an even count). Steps whose speculative run missed
  (`discarded` events: rerun after it) are left out of the choice unless every step missed;
  events without an end are ignored.

  Returns:
    None without events, else {"step", "duration_s", "recorded_steps", "missed_steps_left_out",
    "events": [{kind, device, start_s, end_s, micro_batch, members, models, layer}, ...]}
    (times in seconds from the step's first issue, in issue order).
  """
  by_step: dict[int, list[dict]] = {}
  for e in events:
    if e.get("end") is not None:
      by_step.setdefault(e["step"], []).append(e)
  if not by_step:
    return None
  missed = {s for s, evs in by_step.items() if any(e.get("discarded") for e in evs)}
  candidates = sorted(set(by_step) - missed) or sorted(by_step)
  kept = {s: [e for e in by_step[s] if not e.get("discarded")] or by_step[s] for s in candidates}
  ranked = sorted(candidates, key=lambda s: (_duration(kept[s]), s))
  step = ranked[(len(ranked) - 1) // 2]
  chosen = sorted(kept[step], key=lambda e: e["start"])
  t0 = chosen[0]["start"]
  return {
      "step": step, "duration_s": _duration(chosen), "recorded_steps": len(by_step),
      "missed_steps_left_out": len(missed) if len(candidates) < len(by_step) else 0,
      "events": [{"kind": e["kind"], "device": e["device"],
                  "start_s": round(e["start"] - t0, 7), "end_s": round(e["end"] - t0, 7),
                  "micro_batch": e["micro_batch"], "members": list(e["members"]),
                  "models": list(e["models"]), "layer": e["layer"]} for e in chosen],
  }


def measured_run(c, records, *, run_id: str, log: Callable[[str], None],
                 profile: Callable[[str], Profile] | None = None, backend=None,
                 replicated: bool = False,
                 started: Callable[[], None] | None = None) -> tuple[dict, dict]:
  """Serves one run on this machine's devices (mode "run").

  Args:
    backend: the engine's `Backend` (None: this process's devices).
    replicated: every process of a multi-process run serves it alike (`serving.serve`).
    started: called once the engine has started, before the first request.

  Returns:
    (its `counts` and `wall_clock` blocks, request id -> output tokens of its finished
    requests).
  """
  start = time.perf_counter()
  engine, cfgs = build_engine(c, log=log, backend=backend)
  startup_s = time.perf_counter() - start
  if started is not None:
    started()
  serve_m = serve(engine, cfgs, c, records, profile=None if profile is None else profile(run_id),
                  replicated=replicated)
  serve_m["startup_s"] = startup_s
  metrics = engine.metrics()  # waits for the timeline's stamps (pipeline overlap)
  summary = summarize_run(metrics, serve_m, c.slo)
  timeline = getattr(engine.executor, "timeline", None)
  if timeline is not None and timeline.enabled:
    timeline.wait()
    summary["wall_clock"]["pipeline_step"] = pipeline_step(timeline.events)
  if "profile" in serve_m:
    log(f"   {run_id}: {describe_profile(serve_m['profile'])}")
  log(f"   {run_id}: {startup_s:.0f}s start-up + {serve_m['serve_wall_s']:.0f}s serving")
  done = {r["request_id"] for r in metrics["requests"] if r["status"] == "finished"}
  return summary, {rid: o for rid, o in serve_m["outputs"].items() if rid in done}


def run_experiment(config, *, log: Callable[[str], None], command: str = "",
                   outputs: dict | None = None, trace_dir: str | None = None,
                   profile: Callable[[str], Profile] | None = None,
                   serve_run: Callable | None = None) -> dict:
  """Serves the config's trace(s) under each policy; returns the results dict.

  Args:
    config: an experiment config (module docstring).
    log: progress and engine messages.
    command: the command line that ran it (recorded).
    outputs: if given, filled with "<run name>@<sweep point>" -> request id -> output tokens
      (finished requests; measured runs only).
    trace_dir: if given, each trace is written there as JSONL (replayable with
      config.workload.trace): trace.jsonl, or trace_<point>.jsonl for a sweep.
    profile: if given, called with each run's name ("<run>" or "<run>@<point>"); returns the
      `profile` argument of `serving.serve` for that run (a jax.profiler trace of a few steps).
    serve_run: how one run is served, (run config, records, run_id=, log=) -> (summary,
      finished outputs or None): `measured_run` by default; config.mode "sim" needs the
      simulator's (`crosspool_jax.sim.experiment.simulate_experiment` passes it).
  """
  check_experiment(config)
  mode = config.get("mode", "run")
  if mode == "sim" and serve_run is None:
    raise ValueError("config.mode='sim' is served by the simulator: call "
                     "crosspool_jax.sim.experiment.simulate_experiment")
  if serve_run is None:
    def serve_run(c, records, *, run_id, log):
      return measured_run(c, records, run_id=run_id, log=log, profile=profile)
  served = {} if outputs is None else outputs
  values = list(config.sweep.points) if config.sweep.field else [None]
  runs, traces = [], {}
  t_start = time.perf_counter()
  names = run_names(config)
  total = len(values) * len(names)
  for value in values:
    base = config.copy_and_resolve_references()
    base.unlock()
    if value is not None:
      _set_path(base, config.sweep.field, value)
    expand_fleet(base)
    records, meta = load_trace(base)
    key = _point(value)
    if trace_dir is not None:
      write_jsonl(os.path.join(trace_dir, f"trace_{key}.jsonl" if key else "trace.jsonl"),
                  records, meta=meta)
    # The fleet as served: config.fleet after fleet_size and fleet_dir (`expand_fleet`).
    traces[key] = {"stats": trace_stats(records), "meta": meta,
                   "arrivals": [[r.model_id, r.arrival_s] for r in records],
                   "fleet": json.loads(base.fleet.to_json_best_effort())}
    for name in names:
      log(f"== run {len(runs) + 1}/{total}: {name}"
          + ("" if value is None else f", {config.sweep.field}={value}")
          + f" ({len(records)} requests, {len(base.fleet)} models)")
      c, plan = run_config(base, name, check=mode == "run")
      run_id = name if value is None else f"{name}@{key}"
      run = {"name": name, "sweep_value": value, "engine": dict(c.engine.to_dict()),
             "plan": None if plan is None else dataclasses.asdict(plan)}
      refused = plan is not None and budget_lib.refusal(plan)
      if refused:
        runs.append(run | {"refused": refused})
        log(f"   {name}: refused, {refused}")
        continue
      summary, finished = serve_run(c, records, run_id=run_id, log=log)
      runs.append(run | summary)
      if finished is not None:
        served[f"{name}@{key}"] = finished
      cnt = summary["counts"]
      log(f"   {name}: {cnt['finished']}/{cnt['requests']} finished, {cnt['rejected']} "
          f"rejected, {cnt['preemptions']} preemptions, KV peak {cnt['kv_peak_pages']} of "
          f"{cnt['kv_capacity_pages']} usable pages ({100 * cnt['kv_peak_utilization']:.0f}%)")
  return {
      "experiment": config.name,
      "variant": config.variant,
      "mode": mode,
      "description": config.description,
      "command": command,
      "seed": config.workload.seed,
      "config": json.loads(config.to_json_best_effort()),
      "traces": traces,
      "runs": runs,
      "outputs_agree": _agreement(runs, served) if mode == "run" else {},
      "host_cpus": os.cpu_count(),
      "wall_clock": {"total_s": time.perf_counter() - t_start},
  }


def _agreement(runs: list[dict], outputs: dict) -> dict:
  """Per sweep point: of the requests every policy finished, how many got the same tokens."""
  out = {}
  for point in dict.fromkeys(_point(r["sweep_value"]) for r in runs):
    served = [outputs[f"{r['name']}@{point}"] for r in runs if _point(r["sweep_value"]) == point]
    common = set.intersection(*(set(o) for o in served))
    same = sum(all(o[rid] == served[0][rid] for o in served[1:]) for rid in common)
    out[point] = {"compared": len(common), "same": same, "all_same": same == len(common)}
  return out


def _point(value) -> str:
  return "" if value is None else str(value)
