r"""Builds a trained cold fleet from a seed: one tiny base per family, K fine-tunes of each.

  python scripts/make_fleet.py --out=workdir/fleet
  python scripts/make_fleet.py --config=configs/train/fleet.py:smoke --out=/tmp/fleet_smoke
  python scripts/make_fleet.py --config.finetune.trainable=experts --out=workdir/fleet_eo
  # a family at a time into one fleet (the other families' models are kept):
  python scripts/make_fleet.py --config.families="('qwen2_moe',)" --out=workdir/fleet

Each model is an HF checkpoint with its byte-level tokenizer in `--out/<id>/` (ids
`<family>_base`, `<family>_<domain>`), so `scripts/generate.py --checkpoint=--out/<id>
--prompt=...` and `load_checkpoint` read it; `--out/fleet.json` lists the models, their bases,
domains and held-out losses. Progress lines go to stderr; the last stdout line is a JSON
summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.train.fleet import FLEET_FILE, build_fleet

FLAGS = flags.FLAGS
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  config_flags.DEFINE_config_file(
      "config", os.path.join(_ROOT, "configs", "train", "fleet.py"),
      "Fleet config file (ml_collections).", lock_config=True)
  flags.DEFINE_string("out", None, "Output directory of the fleet (created).", required=True)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  manifest = build_fleet(FLAGS.config, FLAGS.out, log=progress)
  print(json.dumps({"fleet": os.path.join(FLAGS.out, FLEET_FILE),
                    "models": [m["id"] for m in manifest["models"]],
                    "build_s": manifest["build_s"],
                    "total_build_s": round(sum(manifest["build_s"].values()), 2)}))


if __name__ == "__main__":
  define_flags()
  run_script(main)
