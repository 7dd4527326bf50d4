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
                same tokens, the full config, the seed, the command, the git revision,
                the device and the machine's load average at the start and the end;
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

Across processes: started by scripts/launch_local.py, every process runs the experiment alike
with the crosspool runs' KV devices and weights devices in different processes
(`config.processes.kv` / `.weights`, process:local_index; by default KV 0:0, weights 1:0):

  python scripts/launch_local.py --num_processes=2 --target=scripts/run_experiment.py \
      --target_args="--config=configs/experiments/demo.py:cpu_2proc \
      --workdir=workdir/demo_cpu_2proc"

Only the crosspool-family runs are served there (the others are named in the output and in
results.json's `processes.not_served`); arrivals must not follow the wall clock
(`--config.arrival_mode=logical` or `all_at_once`), config.max_wall_s is not applied (the
launcher's --timeout_s bounds the run), the launcher's --local_cpu_devices replaces
config.num_cpu_devices, and --profile_dir is refused. Process 0 alone writes the workdir;
results.json gains `processes` (count, transport, device groups, runs not served) and each
run's `counts.cross_process` (every process's transfers at start-up and while serving, arrays
and bytes per step). A process that dies makes the others fail (PeerLostError) and the
launcher exit non-zero. `--config=...demo.py:cpu_2proc` alone is the same run in one process.
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
from crosspool_jax.distributed.runtime import launched
from crosspool_jax.experiments.plots import write_plots
from crosspool_jax.experiments.processes import Processes, check_processes
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
  processes = None
  if launched():  # a process of a multi-process run (scripts/launch_local.py)
    check_processes(config)
    if FLAGS.profile_dir:
      raise ValueError("--profile_dir: not across processes (each would trace its own part)")
    processes = Processes.join()  # before any JAX computation
    config = processes.prepare(config, progress)
  elif config.num_cpu_devices and not simulated:  # CPU only; before any JAX computation
    jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
  writes = processes is None or processes.writes
  workdir = FLAGS.workdir or os.path.join(
      _ROOT, "workdir", f"{config.name}_{config.variant}" + ("_sim" if simulated else ""))
  if writes:
    os.makedirs(workdir, exist_ok=True)
  where = (f"simulated {config.sim.device} devices" if simulated else
           f"{len(jax.devices())} {jax.devices()[0].platform} device(s)")
  progress(f"experiment {config.name} ({config.variant}) on {where}: runs "
           f"{', '.join(run_names(config))}"
           + (f" x {config.sweep.field} in {tuple(config.sweep.points)}" if config.sweep.field
              else ""))
  start, load_start = time.perf_counter(), os.getloadavg()
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
                             trace_dir=workdir if writes else None, profile=profile,
                             serve_run=None if processes is None else processes.serve_run)
    device = jax.devices()[0]
    results["device"] = {"platform": device.platform, "device_kind": device.device_kind,
                         "count": len(jax.devices())}
    # the machine's 1/5/15-minute load averages: how busy it was besides the run
    results["wall_clock"]["load_average"] = {"start": load_start, "end": os.getloadavg()}
  if processes is not None:
    results["processes"] = processes.results()
    processes.finish()
    if not writes:
      print(f"process {processes.process}: served; process 0 writes {workdir}")
      return
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
  if processes is not None:
    print(f"Across {processes.process_config.num_processes} processes (KV devices "
          f"{', '.join(processes.devices['kv'])}, weights devices "
          f"{', '.join(processes.devices['weights'])}); not served there: "
          + ("; ".join(f"{n} ({why})" for n, why in processes.not_served.items()) or "none"))
  print(f"wrote {workdir}/results.json and {len(plots)} plots in "
        f"{time.perf_counter() - start:.0f}s")
  if FLAGS.profile_dir:
    print(f"profiler traces: {FLAGS.profile_dir}/<run> (one per run; tensorboard "
          f"--logdir={FLAGS.profile_dir}, or plugins/profile/*/perfetto_trace.json.gz in "
          "ui.perfetto.dev)")


if __name__ == "__main__":
  define_flags()
  run_script(main)
