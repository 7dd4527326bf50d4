"""Calibration of the cost model on measured steps, and validation of its predictions.

A measured experiment whose arrivals follow the logical clock (`arrival_mode="logical"`) has
a schedule that does not depend on the machine: the same config simulated
(`config.mode="sim"`, same arrival mode) runs the same steps with the same batches
(`simulate_like` checks it: the KV pages in use after every step, and the trace's arrivals,
must agree). So each measured step's wall seconds (the gaps of its run's
`kv_pool_timeline_t_s`) pair with the simulated step's `Work`, and `fit` solves the bounded
linear least squares over every step of a policy's runs (one calibration per policy: the
CrossPool executor drives every layer from the host, the colocated one a whole model step):

  measured_s ~ host_step_s + first_run_s * first_runs + dispatch_s * programs
               + link_latency_s * transfers + sum over stages k of work_k / efficiency_k

with the host terms >= 0 and each efficiency in (0, 1]. That is the step of devices sharing
the host (`DeviceSpec.shared_host`, the CPU's emulated devices: every term adds), so only
such devices calibrate here. A stage whose work is 0 in every step keeps efficiency 1, a
latency no step exercises keeps the device's estimate.

`validate` simulates another measured experiment with the calibration and sets the measured
and the predicted TTFT / TBT percentiles of each run side by side.

On an accelerator (devices that overlap: no step-level fit), `fit_kernels` calibrates from
`scripts/bench_kernels.py` JSON instead: each stage's efficiency is its kernels' roofline
seconds at the device's datasheet peaks over their measured seconds, summed over the sweep
(`KERNEL_STAGES`: the paged attention and KV write time the attention side, the expert
dispatch the experts). The kernels are a stage's dominant program, not all of it (the
projections and norms around them run as XLA ops), so the fit is an upper bound on the
stage's efficiency; the host terms keep their defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from scipy import optimize

from crosspool_jax.experiments.runner import run_experiment
from crosspool_jax.roofline import DEVICES, device_spec
from crosspool_jax.sim.cost_model import STAGES, Efficiency, Work
from crosspool_jax.sim.experiment import HOST_TERMS, SPEC_OVERRIDES, sim_config, simulate_run

# the fitted terms, in the order of `features`' columns
TERMS = (*HOST_TERMS, *SPEC_OVERRIDES, *STAGES)
# the latency and percentile fields compared by `validate`
COMPARED = (("ttft_s", "p50"), ("ttft_s", "p99"), ("tbt_s", "p50"), ("tbt_s", "p99"))
# the kind of stage each scripts/bench_kernels.py kernel times (`fit_kernels`)
KERNEL_STAGES = {"ragged_paged_attention": "attention", "kv_write": "attention",
                 "expert_dispatch": "experts"}


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Fitted host and efficiency terms of one device kind.

  Attributes:
    device: the `roofline.DEVICES` kind fitted.
    host_step_s, first_run_s, dispatch_s, link_latency_s: the host's seconds per step, per
      first run of a program at a shape, per program launch, per device-to-device transfer.
    efficiency: each stage's achieved fraction of the roofline.
    steps: measured steps fitted.
    fit: the fit's quality: r2 (of the step seconds), median and p90 absolute relative error
      of a step's prediction, and which terms no step exercised (kept at their defaults).
  """

  device: str
  host_step_s: float
  first_run_s: float
  dispatch_s: float
  link_latency_s: float
  efficiency: Efficiency
  steps: int = 0
  fit: dict = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> Calibration:
    return cls(**(d | {"efficiency": Efficiency(**d["efficiency"])}))

  def apply(self, config) -> None:
    """Sets config.sim (device, host step, latencies, efficiencies) to this calibration."""
    config.sim.device = self.device
    for name in (*HOST_TERMS, *SPEC_OVERRIDES):
      config.sim[name] = getattr(self, name)
    config.sim.efficiency = ml_collections.ConfigDict(dataclasses.asdict(self.efficiency))

  def flags(self) -> list[str]:
    """The same settings as `--config.sim.*` flags of scripts/run_experiment.py."""
    out = [f"--config.sim.device={self.device}"]
    out += [f"--config.sim.{k}={getattr(self, k):.6g}" for k in (*HOST_TERMS, *SPEC_OVERRIDES)]
    return out + [f"--config.sim.efficiency.{k}={getattr(self.efficiency, k):.6g}"
                  for k in STAGES]


def features(work: Work) -> list[float]:
  """A step's row of the fit (`TERMS`): 1, its first runs, programs, transfers, and stages at
  the roofline."""
  return [1.0, float(work.first_runs), float(work.programs), float(work.transfers),
          *(getattr(work, kind) for kind in STAGES)]


def measured_step_s(run: dict) -> list[float]:
  """A measured run's step seconds: the gaps between its steps' ends (the first step's start
  is not recorded: it has none)."""
  t = run["wall_clock"]["kv_pool_timeline_t_s"]
  return [b - a for a, b in itertools.pairwise(t)]


def combine_reruns(reruns: Sequence[dict]) -> dict:
  """Several measured runs of one experiment (same config and trace: the same schedule under
  logical arrivals) as one: each step's seconds the median of its reruns' (the timeline
  rebuilt from them), each `COMPARED` percentile the median of the reruns', their values kept
  under `wall_clock["reruns"]`. The machine's noise then moves what is fitted and compared
  less. ValueError if the reruns are not of one experiment or their schedules differ."""
  for results in reruns:
    _check_measured(results)
  first = reruns[0]
  for other in reruns[1:]:
    same = (other["traces"] == first["traces"] and len(other["runs"]) == len(first["runs"])
            and all((a["name"], a["engine"], a["plan"]) == (b["name"], b["engine"], b["plan"])
                    for a, b in zip(other["runs"], first["runs"], strict=False)))
    if not same:
      raise ValueError(f"not reruns of one experiment (traces, runs, engines or plans differ): "
                       f"{first['command']!r} and {other['command']!r}")
  combined = dict(first, runs=[])
  for i, run in enumerate(first["runs"]):
    runs = [r["runs"][i] for r in reruns]
    if "refused" in run:
      combined["runs"].append(run)
      continue
    if any(r["counts"]["kv_used_pages_per_step"] != run["counts"]["kv_used_pages_per_step"]
           for r in runs):
      raise ValueError(f"run {run['name']}: the reruns' schedules differ (arrival_mode must "
                       "be 'logical')")
    steps = np.median([measured_step_s(r) for r in runs], axis=0)
    wall = dict(run["wall_clock"],
                kv_pool_timeline_t_s=[0.0, *np.cumsum(steps).tolist()],
                reruns={f"{f}_{p}": [r["wall_clock"][f][p] for r in runs] for f, p in COMPARED})
    for field, pct in COMPARED:
      wall[field] = dict(wall[field], **{pct: float(np.median(wall["reruns"][f"{field}_{pct}"]))})
    combined["runs"].append(dict(run, wall_clock=wall))
  return combined


def _check_measured(results: dict) -> None:
  if results.get("mode") != "run" or "runs" not in results:
    raise ValueError("a measured results file is needed (scripts/run_experiment.py, mode "
                     f"'run'), got mode {results.get('mode')!r}")


def _runs(results: dict, name: str | None) -> list[dict]:
  return [r for r in results["runs"] if name is None or r["name"] == name]


def simulate_like(results: dict, device: str, *, log: Callable[[str], None],
                  calibration: Calibration | None = None,
                  name: str | None = None) -> tuple[dict, dict[str, list[Work]]]:
  """The measured experiment `results` simulated on `device` (its own config, mode "sim"):
  every run, or only those named `name`.

  Returns:
    (the simulated results dict, run id -> every step's `Work`).

  Raises:
    ValueError: `results` is not a measured experiment with logical arrivals, or the
      simulated schedule differs from the measured one (naming the run and the step).
  """
  _check_measured(results)
  config = ml_collections.ConfigDict(results["config"])
  if config.arrival_mode != "logical":
    raise ValueError("calibration pairs measured and simulated steps one to one, which needs "
                     f"arrival_mode='logical'; {results['experiment']} ran with "
                     f"{config.arrival_mode!r}")
  config.mode, config.sim.device = "sim", device
  if name is not None:
    config.policies = {name: config.policies[name]}
  if calibration is not None:
    calibration.apply(config)
  work: dict[str, list[Work]] = {}
  c = sim_config(config)
  simulated = run_experiment(c, log=log, serve_run=functools.partial(simulate_run, work=work))
  for key, trace in results["traces"].items():
    if simulated["traces"][key]["arrivals"] != trace["arrivals"]:
      raise ValueError(f"the simulated trace {key or '(single)'} differs from the measured one: "
                       "the results' config does not regenerate its trace")
  for measured, sim in zip(_runs(results, name), simulated["runs"], strict=True):
    if "refused" in measured or "refused" in sim:
      continue
    a, b = measured["counts"]["kv_used_pages_per_step"], sim["counts"]["kv_used_pages_per_step"]
    if a != b:
      first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                   min(len(a), len(b)))
      raise ValueError(f"run {measured['name']}: the simulated schedule differs from the "
                       f"measured one at step {first} ({len(a)} measured steps, {len(b)} "
                       "simulated; KV pages in use differ)")
  return simulated, work


def step_samples(results: dict, work: dict[str, list[Work]],
                 name: str) -> list[tuple[Work, float]]:
  """(simulated `Work`, measured seconds) of every step of the runs named `name` (every sweep
  point), each run's first step excluded."""
  out = []
  for run in results["runs"]:
    if run["name"] != name or "refused" in run:
      continue
    run_id = name if run["sweep_value"] is None else f"{name}@{run['sweep_value']}"
    out += list(zip(work[run_id][1:], measured_step_s(run), strict=True))
  return out


def fit(samples: Sequence[tuple[Work, float]], device: str) -> Calibration:
  """Bounded least squares of the measured step seconds on the steps' `features` (module
  docstring)."""
  spec = device_spec(device)
  if not spec.shared_host:
    raise ValueError(f"device {device!r}: calibration fits steps whose programs all add up "
                     "(devices sharing the host, e.g. 'cpu'); its steps overlap devices")
  if len(samples) < len(TERMS):
    raise ValueError(f"{len(samples)} measured steps cannot fit {len(TERMS)} terms")
  x = np.array([features(w) for w, _ in samples])
  y = np.array([s for _, s in samples])
  used = np.flatnonzero(np.abs(x).sum(0) > 0)
  scale = np.linalg.norm(x[:, used], axis=0)
  lower = np.array([0.0 if t in (*HOST_TERMS, *SPEC_OVERRIDES) else 1.0 for t in TERMS])
  solved = optimize.lsq_linear(x[:, used] / scale, y, bounds=(lower[used] * scale, np.inf),
                               method="bvls")
  coef = (dict.fromkeys(HOST_TERMS, 0.0) | {t: getattr(spec, t) for t in SPEC_OVERRIDES}
          | dict.fromkeys(STAGES, 1.0))
  for j, value in zip(used, solved.x / scale, strict=True):
    coef[TERMS[j]] = max(float(value), lower[j])  # the solver's bounds up to rounding
  predicted = x @ np.array([coef[t] for t in TERMS])
  rel = np.abs(predicted - y) / np.maximum(y, 1e-9)
  ss = float(((y - y.mean()) ** 2).sum())
  return Calibration(
      device=device, **{t: coef[t] for t in (*HOST_TERMS, *SPEC_OVERRIDES)},
      efficiency=Efficiency(**{k: min(1.0, 1.0 / coef[k]) for k in STAGES}),
      steps=len(samples),
      fit={"r2": 1.0 - float(((y - predicted) ** 2).sum()) / ss if ss else 1.0,
           "median_abs_rel_error": float(np.median(rel)),
           "p90_abs_rel_error": float(np.percentile(rel, 90)),
           "unexercised": [TERMS[j] for j in range(len(TERMS)) if j not in set(used)]})


def calibrate(results: dict, device: str = "cpu", *,
              log: Callable[[str], None] = lambda msg: None) -> dict[str, Calibration]:
  """Fits `device`'s cost model to the measured experiment `results`, one `Calibration` per
  run name (policy): each executor has its own host costs (module docstring)."""
  _, work = simulate_like(results, device, log=log)
  names = dict.fromkeys(r["name"] for r in results["runs"] if "refused" not in r)
  return {name: fit(step_samples(results, work, name), device) for name in names}


def validate(results: dict, calibrations: dict[str, Calibration], *,
             log: Callable[[str], None] = lambda msg: None) -> list[dict]:
  """Each run of the measured experiment `results` whose name has a calibration, predicted
  with it (each calibration's runs simulated alone).

  Returns:
    Per run: name, sweep value, and for each `COMPARED` latency percentile (ms) the
    measured (of `combine_reruns`: the median of the reruns, each kept), the predicted and the
    error (predicted / measured - 1).
  """
  rows = []
  for name, calibration in calibrations.items():
    simulated, _ = simulate_like(results, calibration.device, log=log, calibration=calibration,
                                 name=name)
    for measured, sim in zip(_runs(results, name), simulated["runs"], strict=True):
      if "refused" in measured or "refused" in sim:
        continue
      row = {"name": name, "sweep_value": measured["sweep_value"]}
      reruns = measured["wall_clock"].get("reruns", {})
      for field, pct in COMPARED:
        m = 1e3 * measured["wall_clock"][field][pct]
        p = 1e3 * sim["simulated"][field][pct]
        row[f"{field}_{pct}"] = {
            "measured_ms": m, "predicted_ms": p, "error": p / m - 1.0 if m else None,
            "reruns_ms": [1e3 * v for v in reruns.get(f"{field}_{pct}", [])]}
      rows.append(row)
  return rows


def kernel_device(header: dict) -> str:
  """The `DEVICES` kind of a scripts/bench_kernels.py header (by `device_kind`); ValueError
  if none has it."""
  kind = header.get("device_kind")
  names = [d.name for d in DEVICES.values() if kind in d.device_kinds]
  if not names:
    raise ValueError(f"device_kind {kind!r} of the kernel benchmark is no known device's; "
                     "pass the device kind explicitly")
  return names[0]


def fit_kernels(bench: dict, device: str | None = None, *, impl: str = "pallas"
                ) -> Calibration:
  """A device's stage efficiencies from the scripts/bench_kernels.py JSON `bench` measured on
  it (module docstring), from the records of implementation `impl` (the compiled Pallas
  kernels by default) without an error.

  Args:
    bench: {"header", "records"} as bench_kernels.py writes them.
    device: the `DEVICES` kind measured; None: the header's `device_kind`'s. A device with
      known `device_kinds` must include the header's.
    impl: the implementation whose timings count ("pallas", "reference", ...).

  Raises:
    ValueError: a device that is not the benchmark's, or no usable record of `impl`.
  """
  if not isinstance(bench, dict) or "header" not in bench or "records" not in bench:
    raise ValueError("a scripts/bench_kernels.py JSON ({'header', 'records'}) is needed")
  header = bench["header"]
  device = device or kernel_device(header)
  spec = device_spec(device)
  if spec.device_kinds and header.get("device_kind") not in spec.device_kinds:
    raise ValueError(f"the kernels ran on {header.get('device_kind')!r}, not on a {device!r} "
                     f"device ({', '.join(spec.device_kinds)})")
  at_roofline = dict.fromkeys(STAGES, 0.0)
  measured = dict.fromkeys(STAGES, 0.0)
  ratios: dict[str, list[float]] = {k: [] for k in STAGES}
  for r in bench["records"]:
    stage = KERNEL_STAGES.get(r["kernel"])
    if stage is None or r["impl"] != impl or r.get("error") or not r.get("median_ms"):
      continue
    roof = max(r["flops"] / spec.flops_per_s(r["dtype"]), r["bytes"] / spec.hbm_bytes_per_s)
    at_roofline[stage] += roof
    measured[stage] += r["median_ms"] / 1e3
    ratios[stage].append(roof / (r["median_ms"] / 1e3))
  timed = [k for k in STAGES if ratios[k]]
  if not timed:
    impls = sorted({r["impl"] for r in bench["records"]})
    raise ValueError(f"no record of impl {impl!r} without an error for a kernel of "
                     f"{sorted(KERNEL_STAGES)}; the benchmark has impls {impls}")
  return Calibration(
      device=device, **dict.fromkeys(HOST_TERMS, 0.0),
      **{t: getattr(spec, t) for t in SPEC_OVERRIDES},
      efficiency=Efficiency(**{k: min(1.0, at_roofline[k] / measured[k]) if k in timed
                               else 1.0 for k in STAGES}),
      fit={"source": "kernels", "impl": impl,
           "records": {k: len(ratios[k]) for k in timed},
           "record_efficiency_range": {k: [min(ratios[k]), max(ratios[k])] for k in timed},
           "unexercised": [k for k in STAGES if k not in timed] + list(HOST_TERMS)})
