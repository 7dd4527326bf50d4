r"""Converts an HF checkpoint directory into an orbax one of ours (loads faster, dtype chosen).

  python scripts/convert_checkpoint.py --checkpoint=/path/to/hf_ckpt --out=/path/to/orbax \
      --dtype=bfloat16
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence

import jax.numpy as jnp
from absl import flags

from crosspool_jax.cli import run_script, start_script
from crosspool_jax.models.checkpoint import load_checkpoint, save_params
from crosspool_jax.models.tokenizer import TOKENIZER_FILE

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_string("checkpoint", None, "HF checkpoint directory.", required=True)
  flags.DEFINE_string("out", None, "Output orbax directory.", required=True)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param dtype.")
  flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  start = time.perf_counter()
  cfg, params = load_checkpoint(FLAGS.checkpoint, dtype=jnp.dtype(FLAGS.dtype))
  out = save_params(FLAGS.out, cfg, params, overwrite=FLAGS.overwrite)
  for extra in (TOKENIZER_FILE,):
    src = f"{FLAGS.checkpoint}/{extra}"
    try:
      shutil.copy(src, f"{out}/{extra}")
    except FileNotFoundError:
      pass
  print(json.dumps({"out": out, "family": cfg.family, "dtype": FLAGS.dtype,
                    "seconds": round(time.perf_counter() - start, 3)}))


if __name__ == "__main__":
  define_flags()
  run_script(main)
