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

On a GPU or TPU the devices overlap, so no step-level fit applies: --kernels takes the JSON of
scripts/bench_kernels.py run there and fits each stage's efficiency from the compiled
kernels' timings against the device's datasheet roofline (`fit_kernels`; the device kind from
the benchmark's header unless --device names it). Its flags then simulate that device, and
--validate compares them with experiments measured on it:

  python scripts/bench_kernels.py --sweep=full --dtype=bfloat16 --out=workdir/bench/h200.json
  python scripts/calibrate.py --kernels=workdir/bench/h200.json --out=workdir/bench/h200_cal.json
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
from crosspool_jax.sim.calibrate import (
  Calibration,
  calibrate,
  combine_reruns,
  fit_kernels,
  validate,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_string("fit", None, "Measured results.json to calibrate on (logical arrivals), "
                      "or reruns of it, comma-separated.")
  flags.DEFINE_string("kernels", None, "scripts/bench_kernels.py JSON measured on an "
                      "accelerator to calibrate its stage efficiencies on (instead of --fit).")
  flags.DEFINE_string("kernel_impl", "pallas", "With --kernels: the implementation whose "
                      "timings count.")
  flags.DEFINE_multi_string("validate", [], "Measured results.json files to predict (each "
                            "may be reruns, comma-separated).")
  flags.DEFINE_string("device", None, "The device kind calibrated: with --fit devices "
                      "sharing the host ('cpu', the default); with --kernels the benchmark's "
                      "(default: from its header).")
  flags.DEFINE_string("out", None, "JSON file to write (optional).")


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


def _kernel_calibration() -> tuple[Calibration, dict]:
  """--kernels' calibration and where it came from."""
  try:
    with open(FLAGS.kernels) as f:
      bench = json.load(f)
    calibration = fit_kernels(bench, FLAGS.device, impl=FLAGS.kernel_impl)
  except (OSError, json.JSONDecodeError, ValueError) as e:
    raise app.UsageError(f"--kernels={FLAGS.kernels}: {e}") from e
  fit = calibration.fit
  print(f"{calibration.device}: efficiency " + ", ".join(
      f"{k} {getattr(calibration.efficiency, k):.3f} ({n} records, each "
      f"{lo:.3f}-{hi:.3f})" for k, n in fit["records"].items()
      for lo, hi in [fit["record_efficiency_range"][k]]) + "\n  " + " ".join(calibration.flags()))
  header = bench["header"]
  return calibration, {"path": os.path.relpath(FLAGS.kernels),
                       "device_kind": header.get("device_kind"),
                       "git_revision": header.get("git_revision"), "date": header.get("date")}


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  if (FLAGS.fit is None) == (FLAGS.kernels is None):
    raise app.UsageError("give one of --fit (measured experiments on devices sharing the "
                         "host) or --kernels (bench_kernels.py JSON of an accelerator)")
  kernel_calibration = None
  if FLAGS.kernels:
    kernel_calibration, fit_source = _kernel_calibration()
    calibrations = {}
  else:
    fitted, fit_source = _load("fit", FLAGS.fit)
    try:
      calibrations = calibrate(fitted, FLAGS.device or "cpu", log=lambda msg: None)
    except ValueError as e:
      raise app.UsageError(f"--fit={FLAGS.fit}: {e}") from e
  for name, c in calibrations.items():
    print(f"{name}: {c.steps} steps, r2 {c.fit['r2']:.2f}, median |error| of a step "
          f"{100 * c.fit['median_abs_rel_error']:.0f}%\n  " + " ".join(c.flags()))
  validations = []
  for path in FLAGS.validate:
    results, src = _load("validate", path)
    if kernel_calibration is not None:  # one calibration for every policy
      calibrations = {r["name"]: kernel_calibration for r in results["runs"]
                      if "refused" not in r}
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
      header = {"command": shlex.join(["python", *sys.argv]), "git_revision": git_revision(),
                "git_dirty": git_dirty(),
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
      if kernel_calibration is None:
        json.dump({"kind": "sim_validation", **header, "device": FLAGS.device or "cpu",
                   "fit": fit_source,
                   "calibrations": {k: c.to_dict() for k, c in calibrations.items()},
                   "validations": validations}, f, indent=1)
      else:  # one calibration for every policy
        json.dump({"kind": "sim_kernel_calibration", **header,
                   "device": kernel_calibration.device, "kernels": fit_source,
                   "calibration": kernel_calibration.to_dict(), "validations": validations},
                  f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  run_script(main)
