"""Calibration of the simulator on measured steps: the fit recovers the terms that made the
steps, calibrating on runs the simulator itself produced (with known terms, shaped as measured
results) predicts another trace exactly, and what cannot be paired is refused by name."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crosspool_jax.experiments.report import validation_section
from crosspool_jax.roofline import device_spec
from crosspool_jax.sim.calibrate import (
  Calibration,
  calibrate,
  combine_reruns,
  fit,
  fit_kernels,
  simulate_like,
  validate,
)
from crosspool_jax.sim.cost_model import STAGES, CostModel, Efficiency, Work
from crosspool_jax.sim.experiment import simulate_experiment
from tests.conftest import ROOT
from tests.sim.test_experiment import experiment_config

KNOWN = Calibration(device="cpu", host_step_s=4e-4, first_run_s=0.02, dispatch_s=1.5e-3,
                    link_latency_s=2e-4,
                    efficiency=Efficiency(attention=0.03, experts=0.05, head=0.2, transfer=0.5,
                                          swap=0.1))


def _model(c: Calibration) -> CostModel:
  spec = dataclasses.replace(device_spec(c.device), dispatch_s=c.dispatch_s,
                             link_latency_s=c.link_latency_s)
  return CostModel(spec, efficiency=c.efficiency, host_step_s=c.host_step_s,
                   first_run_s=c.first_run_s)


def test_the_fit_recovers_the_terms_that_made_the_steps():
  rng = np.random.default_rng(0)
  works = [Work(programs=int(rng.integers(1, 40)), transfers=int(rng.integers(0, 20)),
                first_runs=int(rng.random() < 0.1),
                **{k: float(rng.uniform(0, 1e-4)) for k in STAGES}) for _ in range(200)]
  model = _model(KNOWN)
  got = fit([(w, model.serial_s(w)) for w in works], "cpu")
  for name in ("host_step_s", "first_run_s", "dispatch_s", "link_latency_s"):
    assert getattr(got, name) == pytest.approx(getattr(KNOWN, name), rel=1e-6), name
  for k in STAGES:
    assert getattr(got.efficiency, k) == pytest.approx(getattr(KNOWN.efficiency, k), rel=1e-6)
  assert got.fit["r2"] == pytest.approx(1.0) and got.fit["unexercised"] == []


def test_the_fit_refuses_overlapping_devices_and_too_few_steps():
  with pytest.raises(ValueError, match="'h100_sxm'.*sharing the host"):
    fit([(Work(programs=1), 1.0)] * 20, "h100_sxm")
  with pytest.raises(ValueError, match="3 measured steps cannot fit"):
    fit([(Work(programs=1), 1.0)] * 3, "cpu")


def _as_measured(seed: int) -> dict:
  """The demo experiment simulated on the CPU with `KNOWN`, shaped as a measured results file
  (mode "run", the simulated times as its wall clock)."""
  config = experiment_config("demo.py", None)
  config.workload.seed = seed
  config.mode = "sim"
  KNOWN.apply(config)
  results = simulate_experiment(config, log=lambda msg: None, command=f"seed {seed}")
  for run in results["runs"]:
    run["wall_clock"] = run.pop("simulated")
  results["config"] = json.loads(config.to_json_best_effort()) | {"mode": "run"}
  return results | {"mode": "run", "git_revision": "0" * 40, "created": "now"}


@pytest.fixture(scope="module")
def measured():
  return _as_measured(0), _as_measured(1)


def test_calibrating_on_the_simulators_own_steps_predicts_another_trace_exactly(measured):
  fitted, other = measured
  calibrations = calibrate(fitted)
  assert set(calibrations) == {r["name"] for r in fitted["runs"]}
  for c in calibrations.values():
    assert c.fit["r2"] == pytest.approx(1.0) and c.fit["median_abs_rel_error"] < 1e-9
  rows = validate(other, calibrations)
  assert [r["name"] for r in rows] == [r["name"] for r in other["runs"]]
  for row in rows:
    for key in ("ttft_s_p50", "ttft_s_p99", "tbt_s_p50", "tbt_s_p99"):
      assert row[key]["error"] == pytest.approx(0.0, abs=1e-9), (row["name"], key)
  section = validation_section(
      {"kind": "sim_validation", "command": "c", "device": "cpu",
       "fit": fitted | {"path": "a", "host_cpus": 2},
       "calibrations": {k: c.to_dict() for k, c in calibrations.items()},
       "validations": [{"source": other | {"host_cpus": 2}, "rows": rows}]}, source="v.json")
  assert "0 of 12 cells miss it" in section


def test_steps_that_cannot_be_paired_are_refused_by_name(measured):
  fitted, _ = measured
  changed = copy.deepcopy(fitted)
  pages = changed["runs"][1]["counts"]["kv_used_pages_per_step"]
  pages[3] += 1
  with pytest.raises(ValueError, match=r"run shared: .* differs .* at step 3"):
    simulate_like(changed, "cpu", log=lambda msg: None)
  changed = copy.deepcopy(fitted)
  changed["config"]["arrival_mode"] = "trace"
  with pytest.raises(ValueError, match="needs arrival_mode='logical'"):
    simulate_like(changed, "cpu", log=lambda msg: None)
  with pytest.raises(ValueError, match="a measured results file is needed"):
    simulate_like(fitted | {"mode": "sim"}, "cpu", log=lambda msg: None)


def test_the_script_writes_the_validation_and_make_benchmarks_renders_it(measured, tmp_path):
  paths = []
  for i, results in enumerate(measured):
    paths.append(str(tmp_path / f"m{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(results, f)
  out = tmp_path / "validation.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "calibrate.py"),
                         f"--fit={paths[0]}", f"--validate={paths[1]}", f"--out={out}"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert "--config.sim.first_run_s=0.02" in proc.stdout
  written = json.loads(out.read_text())
  assert written["kind"] == "sim_validation" and written["validations"][0]["rows"]
  bench = tmp_path / "B.md"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_benchmarks.py"),
                         f"--validation={out}", f"--out={bench}"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert "### Simulator validation: calibrated on demo (seed 0), device cpu" in bench.read_text()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "calibrate.py"),
                         f"--fit={out}"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 1 and "a measured results file is needed" in proc.stderr


def _scaled(results: dict, factor: float) -> dict:
  """A rerun whose every step and latency took `factor` times as long."""
  out = copy.deepcopy(results)
  for run in out["runs"]:
    wall = run["wall_clock"]
    wall["kv_pool_timeline_t_s"] = [factor * t for t in wall["kv_pool_timeline_t_s"]]
    for field in ("ttft_s", "tbt_s"):
      wall[field] = {k: factor * v for k, v in wall[field].items()}
  return out


def test_reruns_combine_as_the_median_of_each_step_and_percentile(measured):
  fitted, other = measured
  combined = combine_reruns([_scaled(fitted, 3.0), fitted, _scaled(fitted, 2.0)])
  for run, twice in zip(combined["runs"], _scaled(fitted, 2.0)["runs"], strict=True):
    assert run["wall_clock"]["kv_pool_timeline_t_s"] == pytest.approx(
        twice["wall_clock"]["kv_pool_timeline_t_s"])
    assert run["wall_clock"]["tbt_s"]["p99"] == pytest.approx(twice["wall_clock"]["tbt_s"]["p99"])
    assert run["wall_clock"]["reruns"]["tbt_s_p99"] == pytest.approx(
        [3 * run["wall_clock"]["tbt_s"]["p99"] / 2, run["wall_clock"]["tbt_s"]["p99"] / 2,
         run["wall_clock"]["tbt_s"]["p99"]])
  with pytest.raises(ValueError, match="not reruns of one experiment"):
    combine_reruns([fitted, other])
  changed = copy.deepcopy(fitted)
  changed["runs"][0]["counts"]["kv_used_pages_per_step"][5] += 1
  with pytest.raises(ValueError, match="run static: the reruns' schedules differ"):
    combine_reruns([fitted, changed])


def _kernel_bench(device_kind: str = "NVIDIA H200") -> dict:
  """bench_kernels.py JSON on an H200 (989 TFLOP/s bf16, 4.8 TB/s), records by hand:
  attention 1 ms at the FLOP peak measured 4 ms, the KV write 1 ms at the bandwidth measured
  1 ms (together 2 / 5 ms: 0.4); the expert dispatch 2 ms of bytes measured 10 ms (0.2); a
  reference record and a failed Pallas one that do not count."""
  def rec(kernel, flops, nbytes, ms, impl="pallas", **kw):
    return {"kernel": kernel, "impl": impl, "dtype": "bfloat16", "flops": flops,
            "bytes": nbytes, "median_ms": ms, **kw}
  return {"header": {"device_kind": device_kind, "backend": "gpu", "git_revision": "abc",
                     "date": "2026-12-03"},
          "records": [rec("ragged_paged_attention", 989e9, 1e6, 4.0),
                      rec("kv_write", 0, 4.8e9, 1.0),
                      rec("expert_dispatch", 1e9, 9.6e9, 10.0),
                      rec("expert_dispatch", 1e9, 9.6e9, 1.0, impl="reference"),
                      rec("expert_dispatch", 1e9, 9.6e9, None, error="Mosaic: no")]}


def test_kernel_timings_give_each_stage_its_efficiency():
  c = fit_kernels(_kernel_bench())
  assert c.device == "h200"
  assert c.efficiency.attention == pytest.approx(0.4)
  assert c.efficiency.experts == pytest.approx(0.2)
  assert (c.efficiency.head, c.efficiency.transfer, c.efficiency.swap) == (1.0, 1.0, 1.0)
  assert (c.host_step_s, c.first_run_s) == (0.0, 0.0)
  assert (c.dispatch_s, c.link_latency_s) == (device_spec("h200").dispatch_s,
                                             device_spec("h200").link_latency_s)
  assert c.fit["records"] == {"attention": 2, "experts": 1}
  assert c.fit["record_efficiency_range"]["attention"] == pytest.approx([0.25, 1.0])
  # the reference timings instead: experts 2 ms of bytes in 1 ms, capped at the roofline
  assert fit_kernels(_kernel_bench(), impl="reference").efficiency.experts == 1.0


def test_kernel_calibration_refuses_what_it_cannot_use():
  with pytest.raises(ValueError, match=r"ran on 'NVIDIA H200', not on a 'h100_sxm' device"):
    fit_kernels(_kernel_bench(), "h100_sxm")
  with pytest.raises(ValueError, match=r"device_kind 'Radeon' .* no known device's"):
    fit_kernels(_kernel_bench("Radeon"))
  with pytest.raises(ValueError, match=r"no record of impl 'interpret'.*\['pallas', "
                                       r"'reference'\]"):
    fit_kernels(_kernel_bench(), impl="interpret")
  with pytest.raises(ValueError, match="bench_kernels.py JSON"):
    fit_kernels({"runs": []})


def test_the_script_calibrates_from_kernel_timings(tmp_path):
  bench, out = tmp_path / "bench.json", tmp_path / "cal.json"
  bench.write_text(json.dumps(_kernel_bench()))
  script = os.path.join(ROOT, "scripts", "calibrate.py")
  proc = subprocess.run([sys.executable, script, f"--kernels={bench}", f"--out={out}"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert "--config.sim.device=h200" in proc.stdout
  assert "--config.sim.efficiency.attention=0.4 " in proc.stdout
  written = json.loads(out.read_text())
  assert written["kind"] == "sim_kernel_calibration"
  assert Calibration.from_dict(written["calibration"]) == fit_kernels(_kernel_bench())
  proc = subprocess.run([sys.executable, script, f"--kernels={bench}", f"--fit={bench}"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 1 and "give one of --fit" in proc.stderr
