"""Plots of a results dict (`runner.run_experiment`), drawn from the data alone (matplotlib).

  latency_cdf.png  TTFT and TBT CDFs of every run
  memory.png       KV pages in use over the engine steps of every run (fraction of the pool)
  activity.png     requests arriving per model over the trace's time (the cold fleet's pulse)
  sweep.png        p99 TBT and p99 TTFT against the swept value (sweeps only)
"""

from __future__ import annotations

import os

import numpy as np


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _label(run: dict) -> str:
  return run["name"] + ("" if run["sweep_value"] is None else f" @ {run['sweep_value']}")


def _cdf(ax, samples_s, label):
  if not samples_s:
    return
  x = np.sort(np.asarray(samples_s) * 1000)
  ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)


def write_plots(results: dict, workdir: str) -> list[str]:
  """Writes the PNGs of the module docstring into workdir; returns their paths."""
  plt = _pyplot()
  title = f"{results['experiment']} ({results['variant']})"
  paths = []

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for run in results["runs"]:
    _cdf(axes[0], run["wall_clock"]["ttft_samples_s"], _label(run))
    _cdf(axes[1], run["wall_clock"]["tbt_samples_s"], _label(run))
  for ax, what in zip(axes, ("TTFT", "TBT"), strict=True):
    ax.set_xscale("log")
    ax.set_xlabel(f"{what} (ms)")
    ax.set_ylabel("fraction of samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"{title}: latency CDFs")
  paths.append(_save(fig, plt, workdir, "latency_cdf.png"))

  fig, ax = plt.subplots(figsize=(8, 4))
  for i, run in enumerate(results["runs"]):  # line styles: runs that coincide stay visible
    used = np.asarray(run["counts"]["kv_used_pages_per_step"], np.float64)
    ax.plot(used / max(1, run["counts"]["kv_capacity_pages"]), label=_label(run),
            linestyle=("-", "--", ":", "-.")[i % 4])
  ax.set_xlabel("engine step")
  ax.set_ylabel("KV pages in use / pool")
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(f"{title}: KV memory over time")
  paths.append(_save(fig, plt, workdir, "memory.png"))

  fig, ax = plt.subplots(figsize=(8, 4))
  for key, trace in results["traces"].items():
    arrivals = trace["arrivals"]
    if not arrivals:
      continue
    end = max(t for _, t in arrivals)
    bins = np.linspace(0, max(end, 1e-3), 41)
    for model in sorted({m for m, _ in arrivals}):
      times = [t for m, t in arrivals if m == model]
      counts, _ = np.histogram(times, bins)
      ax.step(bins[:-1], counts, where="post", label=model + (f" @ {key}" if key else ""))
  ax.set_xlabel("trace time (s)")
  ax.set_ylabel("requests per bin")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(f"{title}: per-model arrivals")
  paths.append(_save(fig, plt, workdir, "activity.png"))

  swept = [r for r in results["runs"] if r["sweep_value"] is not None]
  if swept:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["name"] for r in swept):
      rs = sorted((r for r in swept if r["name"] == name), key=lambda r: r["sweep_value"])
      x = [r["sweep_value"] for r in rs]
      for ax, key in zip(axes, ("tbt_s", "ttft_s"), strict=True):
        y = [np.nan if r["wall_clock"][key]["p99"] is None else 1000 * r["wall_clock"][key]["p99"]
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


def _save(fig, plt, workdir: str, name: str) -> str:
  path = os.path.join(workdir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
