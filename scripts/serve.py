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
replay_speed on the wall clock), on a logical clock of logical_step_s per engine step
(arrival_mode=logical: the same schedule on any machine), or all at once
(arrival_mode=all_at_once), and the engine steps until every request is done. A request the
engine cannot take (unknown model, prompt beyond the model's context, a context that can
never fit its KV pool) is reported and skipped.

Live progress goes to stderr about once a second; the metrics table to stdout at the end.
Writes to --workdir:
  metrics.json: the engine's metrics() (summary, per-request rows, pools, compile counts),
    "serve" (rejections, every request's output tokens, submit lag, wall times, trace
    stats), the full config and the git revision;
  trace.jsonl: the trace that was served (replayable with --config.workload.trace).
`--profile_dir=DIR`: a jax.profiler trace of `--profile_steps` steps after warm-up into DIR
(TensorBoard / XProf, Perfetto).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.experiments.serving import (
  Profile,
  build_engine,
  check_config,
  describe_profile,
  format_table,
  load_trace,
  serve,
)
from crosspool_jax.provenance import git_dirty, git_revision
from crosspool_jax.workloads import trace_stats, write_jsonl

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "serve", "demo.py")
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                  "Serving config file (ml_collections).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (created).", required=True)
  flags.DEFINE_string("profile_dir", None, "If set, a jax.profiler trace of a few steps goes "
                      "there (TensorBoard / XProf, Perfetto).")
  flags.DEFINE_integer("profile_steps", 5, "Engine steps the profiler trace holds (after "
                       f"{Profile.warmup} warm-up steps).", lower_bound=1)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  config = FLAGS.config
  if config.num_cpu_devices:  # before any JAX computation
    jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
  # bad settings and trace files fail before anything is compiled
  check_config(config)
  records, trace_meta = load_trace(config)
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  write_jsonl(os.path.join(workdir, "trace.jsonl"), records, meta=trace_meta)
  progress(f"trace: {len(records)} requests over {records[-1].arrival_s if records else 0:.1f}s "
           f"(x{1 / config.replay_speed:g} wall), models {trace_stats(records).get('per_model')}")

  start = time.perf_counter()
  engine, cfgs = build_engine(config)
  startup_s = time.perf_counter() - start
  progress(f"engine started in {startup_s:.1f}s ({engine.config.kv_policy} KV policy, "
           f"{jax.devices()[0].platform})")

  profile = Profile(FLAGS.profile_dir, steps=FLAGS.profile_steps) if FLAGS.profile_dir else None
  serve_m = serve(engine, cfgs, config, records, profile=profile)
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
  progress(f"wrote {os.path.join(workdir, 'metrics.json')}")
  if profile is not None:
    progress(describe_profile(serve_m["profile"]))


if __name__ == "__main__":
  define_flags()
  run_script(main)
