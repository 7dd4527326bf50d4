r"""Routing statistics of a trained fleet (`scripts/make_fleet.py`): JSON, a table, a plot.

  python scripts/routing_stats.py --fleet=workdir/fleet --out=workdir/fleet/routing.json

Per model and MoE layer: expert load, its entropy, the share of the hot quarter of experts,
layer-to-layer predictability (next-layer experts from the current ones by co-occurrence, vs
popularity alone and chance); per family the hot-expert overlap of a base and its fine-tunes;
and the same for a random init of each family (what every other fleet here routes like). All on
the fleet's held-out text (`crosspool_jax/train/routing_stats.py`). The plot goes next to
--out (`.png`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import flags

from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.train.routing_stats import fleet_stats, plot_stats

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_string("fleet", None, "Fleet directory (with fleet.json).", required=True)
  flags.DEFINE_string("out", None, "Output JSON file.", required=True)
  flags.DEFINE_integer("windows", 16, "Held-out windows per domain each model routes.",
                       lower_bound=2)


def format_table(stats: dict) -> str:
  """One row per model, then per random-init family, then the overlap per family."""
  rows = [f"{'model':<24} {'entropy':>8} {'hot share':>10} {'next: cooc':>11} "
          f"{'popular':>8} {'chance':>7}"]

  def row(name, s):
    p = s["predictability"]["mean"]
    cells = [f"{p[k]:>{w}.3f}" if p[k] is not None else f"{'-':>{w}}"
             for k, w in (("cooccurrence", 11), ("popularity", 8), ("chance", 7))]
    return f"{name:<24} {s['entropy']:>8.3f} {s['hot_share']:>10.3f} {' '.join(cells)}"

  rows += [row(name, s) for name, s in stats["models"].items()]
  rows += [row(f"random init {family}", s) for family, s in stats["random_init"].items()]
  for family, o in stats["hot_overlap"].items():
    mean = sum(o["pairs"].values()) / max(1, len(o["pairs"]))
    rows.append(f"hot-expert Jaccard {family}: {mean:.3f} over {len(o['pairs'])} pairs "
                f"(chance {o['chance']:.3f})")
  return "\n".join(rows)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  stats = fleet_stats(FLAGS.fleet, windows=FLAGS.windows, log=progress)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(stats, f, indent=1)
  plot = plot_stats(stats, os.path.splitext(FLAGS.out)[0] + ".png")
  print(format_table(stats), file=sys.stderr)
  print(json.dumps({"out": FLAGS.out, "plot": plot, "models": len(stats["models"])}))


if __name__ == "__main__":
  define_flags()
  run_script(main)
