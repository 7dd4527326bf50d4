r"""Calibrates the simulator's CPU cost model on one measured experiment, validates it on others.

The measured experiments must follow the logical clock (`arrival_mode="logical"`, as the CPU
demo does): the simulated run of the same config then takes the same steps with the same
batches, so each measured step's seconds pair with the simulated step's work
(`crosspool_jax/sim/calibrate.py`). One calibration per policy is fitted on --fit; each
--validate experiment (another trace of the same fleet) is simulated with them, and its
measured and predicted TTFT / TBT p50 and p99 are set side by side. Each flag takes one
results file or several reruns of one experiment, comma-separated: each step's seconds and
each percentile are then the median of the reruns' (this machine's noise moves a single run's
latencies by tens of percent). Writes JSON to
--out (`scripts/make_benchmarks.py --validation` turns it into a BENCHMARKS.md section) and
prints the calibrations as `--config.sim.*` flags of scripts/run_experiment.py.

  python scripts/run_experiment.py --config=configs/experiments/demo.py --workdir=workdir/val/a
  python scripts/run_experiment.py --config=configs/experiments/demo.py \
      --config.workload.seed=1 --workdir=workdir/val/b
  python scripts/calibrate.py --fit=workdir/val/a/results.json \
      --validate=workdir/val/b/results.json --out=benchmarks/sim/validation_demo.json
  # reruns of each experiment (--workdir=workdir/val/a2, ...), fitted and compared as medians:
  python scripts/calibrate.py --fit=workdir/val/a/results.json,workdir/val/a2/results.json \
      --validate=workdir/val/b/results.json,workdir/val/b2/results.json
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from collections.abc import Sequence

from absl import app, flags

from crosspool_jax.cli import run_script, start_script
from crosspool_jax.provenance import git_dirty, git_revision
from crosspool_jax.sim.calibrate import calibrate, combine_reruns, validate

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_string("fit", None, "Measured results.json to calibrate on (logical arrivals), "
                      "or reruns of it, comma-separated.")
  flags.DEFINE_multi_string("validate", [], "Measured results.json files to predict (each "
                            "may be reruns, comma-separated).")
  flags.DEFINE_string("device", "cpu", "The device kind calibrated (devices sharing the host).")
  flags.DEFINE_string("out", None, "JSON file to write (optional).")
  flags.mark_flag_as_required("fit")


def _load(flag: str, value: str) -> tuple[dict, dict]:
  """A flag's results file, or its reruns combined; and where they came from."""
  reruns = []
  for path in value.split(","):
    try:
      with open(path) as f:
        reruns.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      raise app.UsageError(f"--{flag}={path}: {e}") from e
  try:
    results = combine_reruns(reruns)
  except ValueError as e:
    raise app.UsageError(f"--{flag}={value}: {e}") from e
  return results, {"paths": [os.path.relpath(p) for p in value.split(",")],
                   "experiment": results["experiment"], "variant": results["variant"],
                   "seed": results["seed"], "command": results["command"],
                   "git_revision": results["git_revision"],
                   "created": [r["created"] for r in reruns],
                   "host_cpus": results["host_cpus"]}


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  fitted, fit_source = _load("fit", FLAGS.fit)
  try:
    calibrations = calibrate(fitted, FLAGS.device, log=lambda msg: None)
  except ValueError as e:
    raise app.UsageError(f"--fit={FLAGS.fit}: {e}") from e
  for name, c in calibrations.items():
    print(f"{name}: {c.steps} steps, r2 {c.fit['r2']:.2f}, median |error| of a step "
          f"{100 * c.fit['median_abs_rel_error']:.0f}%\n  " + " ".join(c.flags()))
  validations = []
  for path in FLAGS.validate:
    results, src = _load("validate", path)
    try:
      rows = validate(results, calibrations)
    except ValueError as e:
      raise app.UsageError(f"--validate={path}: {e}") from e
    validations.append({"source": src, "rows": rows})
    print(f"\n{path} (seed {results['seed']}): measured / predicted ms (error)")
    for row in rows:
      cells = [f"{k} {v['measured_ms']:.1f} / {v['predicted_ms']:.1f} "
               f"({100 * v['error']:+.0f}%)" for k, v in row.items() if isinstance(v, dict)]
      print(f"  {row['name']:>12}  " + "  ".join(cells))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"kind": "sim_validation", "command": shlex.join(["python", *sys.argv]),
                 "git_revision": git_revision(), "git_dirty": git_dirty(),
                 "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "device": FLAGS.device, "fit": fit_source,
                 "calibrations": {k: c.to_dict() for k, c in calibrations.items()},
                 "validations": validations}, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  run_script(main)
