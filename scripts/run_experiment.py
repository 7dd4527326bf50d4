r"""Runs one experiment: the same trace under each memory organisation, results as JSON + plots.

  python scripts/run_experiment.py                        # the CPU demo, default settings
  python scripts/run_experiment.py --config=configs/experiments/longest_context.py:cpu \
      --workdir=workdir/longest_context
  python scripts/run_experiment.py --config=configs/experiments/tbt_vs_rate.py:cpu \
      --config.sweep.points=2,4,8 --workdir=workdir/tbt_vs_rate

Each config (configs/experiments/*.py) has a small `cpu` variant and, where it makes sense, a
`full` one for accelerators. Writes to --workdir (default workdir/<experiment>_<variant>):
  results.json  per run (policy x sweep value): `counts` (requests, rejections, preemptions,
                KV pages per step, longest context served, expert hits, compile counts, an
                output digest) and `wall_clock` (TTFT/TBT/E2E percentiles and samples,
                throughput, goodput against config.slo, start-up, the median recorded
                step's pipeline); the traces' statistics, whether all policies produced the
                same tokens, the full config, the seed, the command, the git revision and
                the device;
  *.png         latency CDFs, KV memory over time, per-model arrivals, pipeline.png (one
                step per device of a crosspool and a colocated run), and the sweep's;
  outputs.json  every request's output tokens per run ("<run>@<sweep point>");
  trace.jsonl   the trace served (trace_<point>.jsonl per sweep point), replayable with
                --config.workload.trace;
and prints the comparison table. `--config.mode=sim` serves the same config in simulated time
(crosspool_jax/sim/: no weights needed, fleet entries may name a public reference shape with
`--config.fleet.ID.reference=NAME`) on `config.sim.device`; its results.json has each run's
times under `simulated` instead of `wall_clock`, and every table and plot says "simulated".
`--summary_out=FILE` also writes the results without per-sample arrays (small enough to
commit; make_benchmarks.py reads it). `--profile_dir=DIR` also writes a jax.profiler trace of
`--profile_steps` steps (after warm-up) of each run into DIR/<run> (TensorBoard, Perfetto).
`python scripts/make_benchmarks.py` turns results files into BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.experiments.plots import write_plots
from crosspool_jax.experiments.report import comparison_table
from crosspool_jax.experiments.runner import (
  check_experiment,
  run_experiment,
  run_names,
  without_samples,
)
from crosspool_jax.experiments.serving import Profile
from crosspool_jax.provenance import git_dirty, git_revision
from crosspool_jax.sim.experiment import sim_config, simulate_experiment

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  config_flags.DEFINE_config_file(
      "config", os.path.join(_ROOT, "configs", "experiments", "demo.py"),
      "Experiment config file (ml_collections).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (created); default "
                      "workdir/<experiment>_<variant> under the repository.")
  flags.DEFINE_string("profile_dir", None, "If set, a jax.profiler trace of each run goes to "
                      "DIR/<run name> (TensorBoard / XProf, Perfetto).")
  flags.DEFINE_integer("profile_steps", 5, "Engine steps each profiler trace holds (after "
                       f"{Profile.warmup} warm-up steps).", lower_bound=1)
  flags.DEFINE_string("summary_out", None, "If set, the results without per-sample and "
                      "per-step arrays are also written here (e.g. benchmarks/sim/NAME.json).")


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  config = FLAGS.config
  simulated = config.mode == "sim"
  if simulated:
    if FLAGS.profile_dir:
      raise ValueError("--profile_dir: a simulated run (--config.mode=sim) runs no program")
    check_experiment(sim_config(config))  # a bad config fails before anything runs
  else:
    check_experiment(config)  # a bad config fails before anything is compiled
  if config.num_cpu_devices and not simulated:  # CPU devices only; before any JAX computation
    jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
  workdir = FLAGS.workdir or os.path.join(
      _ROOT, "workdir", f"{config.name}_{config.variant}" + ("_sim" if simulated else ""))
  os.makedirs(workdir, exist_ok=True)
  where = (f"simulated {config.sim.device} devices" if simulated else
           f"{len(jax.devices())} {jax.devices()[0].platform} device(s)")
  progress(f"experiment {config.name} ({config.variant}) on {where}: runs "
           f"{', '.join(run_names(config))}"
           + (f" x {config.sweep.field} in {tuple(config.sweep.points)}" if config.sweep.field
              else ""))
  start = time.perf_counter()
  outputs: dict = {}
  command = shlex.join(["python", *sys.argv])
  if simulated:
    results = simulate_experiment(config, log=progress, command=command, trace_dir=workdir)
  else:
    profile = None
    if FLAGS.profile_dir:
      def profile(run: str) -> Profile:
        return Profile(os.path.join(FLAGS.profile_dir, run), steps=FLAGS.profile_steps)
    results = run_experiment(config, log=progress, command=command, outputs=outputs,
                             trace_dir=workdir, profile=profile)
    device = jax.devices()[0]
    results["device"] = {"platform": device.platform, "device_kind": device.device_kind,
                         "count": len(jax.devices())}
  results |= {
      "git_revision": git_revision(),
      "git_dirty": git_dirty(),
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  if not simulated:
    with open(os.path.join(workdir, "outputs.json"), "w") as f:
      json.dump(outputs, f)
  if FLAGS.summary_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.summary_out)), exist_ok=True)
    with open(FLAGS.summary_out, "w") as f:
      json.dump(without_samples(results), f, indent=1)
      f.write("\n")
  plots = write_plots(results, workdir)
  print(f"\n{config.name} ({config.variant}): {results['description']}")
  print(comparison_table(results))
  print(f"wrote {workdir}/results.json and {len(plots)} plots in "
        f"{time.perf_counter() - start:.0f}s")
  if FLAGS.profile_dir:
    print(f"profiler traces: {FLAGS.profile_dir}/<run> (one per run; tensorboard "
          f"--logdir={FLAGS.profile_dir}, or plugins/profile/*/perfetto_trace.json.gz in "
          "ui.perfetto.dev)")


if __name__ == "__main__":
  define_flags()
  run_script(main)
