r"""Generates tokens from one prompt with the reference (contiguous-cache) decoder.

Prints one JSON object: {"tokens": [generated ids], "text": "..." (when a tokenizer exists)}.

  # No checkpoint: a seeded tiny random model of --family (no torch needed), whose tokenizer is
  # the byte-level one of crosspool_jax.models.tokenizer:
  python scripts/generate.py --family=mixtral --prompt_ids=1,2,3 --max_new_tokens=16
  python scripts/generate.py --family=mixtral --prompt="Hello"
  # An HF checkpoint directory (config.json + *.safetensors [+ tokenizer.json]) or an orbax
  # directory written by scripts/convert_checkpoint.py:
  python scripts/generate.py --checkpoint=/path/to/ckpt --prompt="Hello" --temperature=0.8 \
      --top_p=0.9 --seed=1
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import jax.numpy as jnp
from absl import app, flags

from crosspool_jax.cli import run_script, start_script
from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import FAMILIES, tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.models.sampling import SamplingParams
from crosspool_jax.models.tokenizer import TOKENIZER_FILE, byte_level_tokenizer, load_tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_string("checkpoint", None, "HF or orbax checkpoint directory; if "
                      "unset, a seeded tiny random model of --family.")
  flags.DEFINE_enum("family", "mixtral", FAMILIES, "Family of the random tiny model "
                    "(only without --checkpoint).")
  flags.DEFINE_string("prompt_ids", None, "Comma-separated prompt token ids.")
  flags.DEFINE_string("prompt", None, "Prompt text (needs tokenizer.json in the "
                      "checkpoint directory; the random model has a byte-level tokenizer).")
  flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed (and init seed of the random model).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param dtype.")
  flags.DEFINE_bool("stop_at_eos", True, "Stop at the config's eos token.")


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  if (FLAGS.prompt is None) == (FLAGS.prompt_ids is None):
    raise app.UsageError("give exactly one of --prompt_ids and --prompt")
  dtype = jnp.dtype(FLAGS.dtype)
  start = time.perf_counter()
  if FLAGS.checkpoint:
    cfg, params = load_checkpoint(FLAGS.checkpoint, dtype=dtype)
    tokenizer = load_tokenizer(FLAGS.checkpoint)
  else:
    cfg = tiny_config(FLAGS.family)
    params = init_params(cfg, seed=FLAGS.seed, dtype=dtype)
    tokenizer = byte_level_tokenizer(cfg.vocab_size)
  load_s = time.perf_counter() - start
  if FLAGS.prompt is not None:
    if tokenizer is None:
      raise app.UsageError(f"--prompt needs {TOKENIZER_FILE} in the --checkpoint directory "
                           f"{FLAGS.checkpoint}, which has none; use --prompt_ids")
    prompt = tokenizer.encode(FLAGS.prompt).ids
  else:
    try:
      prompt = [int(t) for t in FLAGS.prompt_ids.split(",") if t.strip()]
    except ValueError as e:
      raise app.UsageError(f"--prompt_ids must be comma-separated integers: {e}") from e
  sampling = SamplingParams(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                            top_p=FLAGS.top_p, seed=FLAGS.seed)
  eos = cfg.eos_token_id
  stop_ids = (eos if isinstance(eos, tuple) else (eos,)) if (eos is not None
                                                               and FLAGS.stop_at_eos) else ()
  start = time.perf_counter()
  (tokens,) = generate(params, cfg, [prompt], max_new_tokens=FLAGS.max_new_tokens,
                       sampling=sampling, stop_ids=stop_ids)
  gen_s = time.perf_counter() - start
  result = {"tokens": tokens}
  if tokenizer is not None:
    result["text"] = tokenizer.decode(tokens)
  print(f"{cfg.family}: loaded in {load_s:.2f}s, generated {len(tokens)} tokens in {gen_s:.2f}s "
        "(including compilation)", file=sys.stderr)
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  run_script(main)
