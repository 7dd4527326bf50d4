"""Plots of a results dict (`runner.run_experiment`), drawn from the data alone (matplotlib).

  latency_cdf.png  TTFT and TBT CDFs of every run
  memory.png       KV memory in use (MiB: used pages x page bytes) over serving time (wall
                   clock: steps differ in length between policies) of every run, each run's
                   usable KV memory as a dashed line of its colour
  activity.png     requests arriving per model per time bin over the trace's time, one row per
                   model (the cold fleet's pulse), the trace's burst windows shaded
  sweep.png        p99 TBT and p99 TTFT against the swept value (sweeps only)
  pipeline.png     Gantt chart of a run's `pipeline_step` (its median recorded step): the
                   first crosspool* run above the first shared (else static) run; a row per
                   device (upper lane transfers, lower lane compute), a bar per stage from
                   issue to output ready, coloured by micro-batch (only if a run has one)
"""

from __future__ import annotations

import math
import os

import numpy as np

from crosspool_jax.experiments.report import is_simulated, latencies, results_title, run_label


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _cdf(ax, samples_s, label):
  if not samples_s:
    return
  x = np.sort(np.asarray(samples_s) * 1000)
  ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)


def write_plots(results: dict, workdir: str) -> list[str]:
  """Writes the PNGs of the module docstring into workdir; returns their paths (a simulated
  results file's titles say SIMULATED; refused runs are left out)."""
  plt = _pyplot()
  title = results_title(results)
  paths = []
  served = [r for r in results["runs"] if not r.get("refused")]

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for run in served:
    _cdf(axes[0], latencies(run)["ttft_samples_s"], run_label(run))
    _cdf(axes[1], latencies(run)["tbt_samples_s"], run_label(run))
  for ax, what in zip(axes, ("TTFT", "TBT"), strict=True):
    ax.set_xscale("log")
    ax.set_xlabel(f"{what} (ms)")
    ax.set_ylabel("fraction of samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"{title}: latency CDFs")
  paths.append(_save(fig, plt, workdir, "latency_cdf.png"))

  paths.append(_memory_plot(plt, results, title, workdir))
  paths.append(_activity_plot(plt, results, title, workdir))
  pipeline = _pipeline_plot(plt, results, title, workdir)
  if pipeline:
    paths.append(pipeline)

  swept = [r for r in served if r["sweep_value"] is not None]
  if swept:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["name"] for r in swept):
      rs = sorted((r for r in swept if r["name"] == name), key=lambda r: r["sweep_value"])
      x = [r["sweep_value"] for r in rs]
      for ax, key in zip(axes, ("tbt_s", "ttft_s"), strict=True):
        y = [np.nan if latencies(r)[key]["p99"] is None else 1000 * latencies(r)[key]["p99"]
             for r in rs]
        ax.plot(x, y, marker="o", label=name)
    for ax, what in zip(axes, ("p99 TBT (ms)", "p99 TTFT (ms)"), strict=True):
      ax.set_xlabel(results["config"]["sweep"]["field"])
      ax.set_ylabel(what)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.suptitle(f"{title}: tail latency against {results['config']['sweep']['field']}")
    paths.append(_save(fig, plt, workdir, "sweep.png"))
  return paths


def _memory_plot(plt, results: dict, title: str, workdir: str) -> str:
  fig, ax = plt.subplots(figsize=(9, 4.5))
  capacities: dict[float, list[str]] = {}
  for run in (r for r in results["runs"] if not r.get("refused")):
    c = run["counts"]
    mib = c["kv_page_bytes"] / 2**20
    line, = ax.plot(latencies(run)["kv_pool_timeline_t_s"],
                    np.asarray(c["kv_used_pages_per_step"]) * mib, drawstyle="steps-post",
                    label=f"{run_label(run)}: in use")
    capacity = c["kv_capacity_pages"] * mib
    ax.axhline(capacity, color=line.get_color(), linestyle="--", linewidth=1)
    capacities.setdefault(capacity, []).append(run_label(run))
  for capacity, names in capacities.items():  # runs of equal capacity share one label
    ax.annotate(f"usable KV memory of {', '.join(names)}: {capacity:.2f} MiB", (0, capacity),
                xycoords=("axes fraction", "data"), xytext=(4, 3), textcoords="offset points",
                fontsize=7)
  clock = "simulated" if is_simulated(results) else "wall clock"
  ax.set_xlabel(f"serving time (s, {clock}, from the first engine step)")
  ax.set_ylabel("KV memory in use (MiB)")
  ax.set_ylim(0, 1.12 * max(capacities, default=1.0))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.set_title(f"{title}: KV memory in use (dashed: each run's usable KV memory)")
  return _save(fig, plt, workdir, "memory.png")


def _bin_width(span_s: float, bins: int = 40) -> float:
  """A round bin width (1, 2 or 5 x 10^k seconds) giving about `bins` bins over span_s."""
  raw = max(span_s, 1e-3) / bins
  scale = 10.0 ** math.floor(math.log10(raw))
  return next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw)


def _generated(meta: dict) -> dict:
  """What generated a trace (workload, bursts): its metadata, or a replayed file's (or {})."""
  return (meta.get("meta") or {}) if "replayed_from" in meta else meta


def _bursts(meta: dict) -> list[dict]:
  """The burst windows of a trace's metadata (generated, or replayed from a file)."""
  return _generated(meta).get("bursts") or []


def _activity_plot(plt, results: dict, title: str, workdir: str) -> str:
  traces = {k: t for k, t in results["traces"].items() if t["arrivals"]}
  models = list(dict.fromkeys(  # popularity order, then any other model that has arrivals
      [*(m for t in traces.values()
         for m in _generated(t["meta"]).get("workload", {}).get("model_ids", ())),
       *(m for t in traces.values() for m, _ in t["arrivals"])]))
  fig, axes = plt.subplots(max(1, len(models)), max(1, len(traces)), squeeze=False,
                           sharex="col", sharey=True, figsize=(max(8, 5 * len(traces)),
                                                 1.2 + 0.9 * max(1, len(models))))
  field = results["config"]["sweep"]["field"]
  shaded = False
  for col, (key, trace) in enumerate(traces.items()):
    bursts = _bursts(trace["meta"])
    end = max(t for _, t in trace["arrivals"])
    width = _bin_width(end)
    edges = np.arange(0, end + width, width)
    if edges.size < 2:
      edges = np.array([0.0, width])
    for row, model in enumerate(models):
      ax = axes[row][col]
      times = [t for m, t in trace["arrivals"] if m == model]
      counts, _ = np.histogram(times, edges)
      for b in bursts:
        if model in b["models"]:
          ax.axvspan(b["start_s"], b["start_s"] + b["duration_s"], color="tab:orange",
                     alpha=0.2, label=None if shaded else "burst window")
          shaded = True
      ax.bar(edges[:-1], counts, width=width, align="edge", color="tab:blue", alpha=0.8)
      ax.axhline(0, color="black", linewidth=0.6)
      ax.set_xlim(0, max([edges[-1], *(b["start_s"] + b["duration_s"] for b in bursts)]))
      ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
      ax.grid(alpha=0.3)
      if col == 0:
        ax.set_ylabel(f"{model}\n({len(times)})", rotation=0, ha="right", va="center",
                      fontsize=8)
      if row == 0 and key:
        ax.set_title(f"{field}={key}", fontsize=9)
      if row == len(models) - 1:
        ax.set_xlabel(f"trace time (s); bars: arrivals per {width:g} s")
  if shaded:
    fig.legend(loc="upper right", fontsize=7)
  fig.suptitle(f"{title}: arrivals per model (requests in the trace in brackets)")
  return _save(fig, plt, workdir, "activity.png")


def pipeline_runs(results: dict) -> list[dict]:
  """The runs pipeline.png draws: the first crosspool* and the first shared (else static) run
  with a recorded `pipeline_step`, in that order."""
  def first(policies):
    for policy in policies:
      for run in results["runs"]:
        if (run.get("engine", {}).get("kv_policy", "").startswith(policy)
            and run.get("wall_clock", {}).get("pipeline_step")):
          return [run]
    return []
  return first(["crosspool"]) + first(["shared", "static"])


_CATEGORIES = (  # (category, hatch, transfer lane)
    ("attention", "", False), ("experts", "//", False), ("model program", "", False),
    ("transfer", "...", True), ("swap", "xx", True), ("other", "oo", False))


def _category(kind: str) -> str:
  if kind.startswith(("attention", "merge")):
    return "attention"
  if kind.startswith("transfer"):
    return "transfer"
  if kind.startswith("swap"):
    return "swap"
  if kind in ("model_step", "decode_loop"):
    return "model program"
  return "experts" if kind == "experts" else "other"


def _device_key(device: str):
  digits = "".join(c if c.isdigit() else " " for c in device).split()
  return (device.rstrip("0123456789"), int(digits[-1]) if digits else -1, device)


def _gantt(ax, run: dict, colours) -> None:
  """One run's pipeline step on `ax`."""
  from matplotlib.patches import Patch

  step = run["wall_clock"]["pipeline_step"]
  events = step["events"]
  hatch = {c: h for c, h, _ in _CATEGORIES}
  upper = {c for c, _, lane in _CATEGORIES if lane}
  devices = sorted({e["device"] for e in events}, key=_device_key)
  row = {d: i for i, d in enumerate(devices)}
  span_ms = 1000 * step["duration_s"]
  colocated = any(_category(e["kind"]) == "model program" for e in events)
  for e in events:
    cat = _category(e["kind"])
    x0, width = 1000 * e["start_s"], 1000 * (e["end_s"] - e["start_s"])
    top, height = ((row[e["device"]] - 0.42, 0.3) if cat in upper else
                   (row[e["device"]] - 0.08, 0.5))
    members = e["members"] or [e["micro_batch"]]
    for j, m in enumerate(members):  # a fused call: one stripe per member micro-batch
      h = height / len(members)
      face = "lightgrey" if cat == "swap" else colours(m % 10)  # a swap-in serves no one
      ax.broken_barh([(x0, width)], (top + j * h, h), facecolors=face,
                     edgecolors="black", linewidth=0.3, hatch=hatch[cat],
                     alpha=0.6 if cat in upper else 1.0)
    text = ", ".join(e["models"]) if colocated else f"L{e['layer']}"
    if width > 0.05 * span_ms and cat not in upper:  # the layer (the model, colocated)
      ax.text(x0 + width / 2, top + height / 2, text, ha="center", va="center", fontsize=7)
  roles = {}
  for e in events:
    roles.setdefault(e["device"], set()).add(_category(e["kind"]))
  labels = []
  for d in devices:
    r = roles[d]
    role = ("KV" if "attention" in r else "weights" if "experts" in r else
            "models " + ", ".join(sorted({m for e in events if e["device"] == d
                                          for m in e["models"]})) if "model program" in r else "")
    labels.append(f"{d}\n{role}" if role else d)
  ax.set_yticks(range(len(devices)), labels, fontsize=8)
  ax.set_ylim(len(devices) - 0.5, -0.5)
  ax.set_xlim(0, 1.02 * max(span_ms, 1e-3))
  ax.set_xlabel("ms from the step's first issue (bars: issue to output ready, i.e. in flight)")
  ax.grid(axis="x", alpha=0.3)
  missed = step.get("missed_steps_left_out", 0)
  swaps = any(_category(e["kind"]) == "swap" for e in events)
  ax.set_title(f"{run_label(run)}: step {step['step']}, {span_ms:.1f} ms, the median of "
               f"{step['recorded_steps'] - missed} recorded steps"
               + (f" ({missed} more left out: their speculative run missed)" if missed else "")
               + ("" if swaps or colocated else "; no expert swap-in"), fontsize=9)
  what = "model batch" if colocated else "micro-batch"
  handles = [Patch(facecolor=colours(m % 10), edgecolor="black", label=f"{what} {m}")
             for m in sorted({m for e in events if _category(e["kind"]) != "swap"
                              for m in (e["members"] or [e["micro_batch"]])})]
  cats = dict.fromkeys(_category(e["kind"]) for e in events)
  handles += [Patch(facecolor="white", edgecolor="black", hatch=hatch[c],
                    label=c + (" (upper lane)" if c in upper else "")) for c in cats]
  ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _pipeline_plot(plt, results: dict, title: str, workdir: str) -> str | None:
  runs = pipeline_runs(results)
  if not runs:
    return None
  rows = [len({e["device"] for e in r["wall_clock"]["pipeline_step"]["events"]}) for r in runs]
  fig, axes = plt.subplots(len(runs), 1, squeeze=False, figsize=(12, 1.6 + 0.9 * sum(rows)
                                                                  + 0.8 * len(runs)),
                           gridspec_kw={"height_ratios": rows})
  colours = plt.get_cmap("tab10")
  for ax, run in zip(axes[:, 0], runs, strict=True):
    _gantt(ax, run, colours)
  fig.suptitle(f"{title}: one step's pipeline per device (each run on its own time axis)")
  return _save(fig, plt, workdir, "pipeline.png")


def _save(fig, plt, workdir: str, name: str) -> str:
  path = os.path.join(workdir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
