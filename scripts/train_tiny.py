r"""Trains one tiny byte-level MoE of any family on the standard library's sources (optax).

  python scripts/train_tiny.py --config=configs/train/tiny.py --workdir=workdir/train_mixtral
  python scripts/train_tiny.py --config=configs/train/tiny.py:smoke --config.family=qwen2_moe \
      --workdir=/tmp/train_smoke
  # stop at step 150 (as if interrupted), then run the same command again without
  # --stop_at: it resumes from the orbax checkpoint exactly.
  python scripts/train_tiny.py --config=configs/train/tiny.py --workdir=DIR --stop_at=150

Writes into --workdir: `checkpoints/` (orbax: params, optimizer state, step, history; every
`train.checkpoint_every` steps), `history.json` (per-step loss, held-out evaluations),
`loss.png`, and `hf/`, the trained model as an HF checkpoint with its byte-level
`tokenizer.json` (`scripts/generate.py --checkpoint=DIR/hf --prompt=...`). Progress lines go
to stderr; the last stdout line is a JSON summary (held-out loss before and after).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.train.corpus import build_corpus
from crosspool_jax.train.export import export_model
from crosspool_jax.train.trainer import plot_history, train, train_config

FLAGS = flags.FLAGS
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  config_flags.DEFINE_config_file(
      "config", os.path.join(_ROOT, "configs", "train", "tiny.py"),
      "Training config file (ml_collections).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (created); a checkpoint in it is "
                      "resumed.", required=True)
  flags.DEFINE_integer("stop_at", None, "Stop after this step (a checkpoint is written), as "
                       "an interrupted run would.")


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  config = FLAGS.config
  cfg = tiny_config(config.family, **config.model)
  tc = train_config(config.train, seed=config.seed)
  corpus = build_corpus(seed=config.seed, vocab_size=cfg.vocab_size, domains=tc.domains,
                        **config.corpus)
  progress(f"corpus: {json.dumps(corpus.summary())}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  result = train(cfg, init_params(cfg, seed=config.seed), corpus, tc, workdir=FLAGS.workdir,
                 stop_at=FLAGS.stop_at, log=progress)
  with open(os.path.join(FLAGS.workdir, "history.json"), "w") as f:
    json.dump(result.history, f)
  plot = plot_history(result.history, os.path.join(FLAGS.workdir, "loss.png"),
                      title=f"{cfg.family} tiny MoE, seed {config.seed}")
  summary = {"family": cfg.family, "steps": len(result.history["loss"]),
             "resumed_from": result.resumed_from, "wall_s": round(result.wall_s, 2),
             "heldout_before": result.history["eval"][0],
             "heldout_after": result.history["eval"][-1], "plot": plot}
  if len(result.history["loss"]) == tc.steps:
    summary["checkpoint"] = export_model(os.path.join(FLAGS.workdir, "hf"), cfg, result.params)
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  run_script(main)
