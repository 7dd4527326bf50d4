r"""Writes a tiny random HF-format MoE checkpoint (config, safetensors, tokenizer) via transformers.

The fixture of the tests and demos; needs the `hf` extra (torch CPU + transformers), no network.

  python scripts/make_tiny_checkpoint.py --family=qwen2_moe --out=/tmp/tiny_qwen2_moe
  python scripts/make_tiny_checkpoint.py --family=mixtral --out=/tmp/m --num_shards=3 \
      --override=num_layers=4 --override=d_model=128
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from crosspool_jax.cli import run_script
from crosspool_jax.models.config import MODEL_FAMILIES, tiny_config, to_hf_config
from crosspool_jax.models.tokenizer import MIN_VOCAB_SIZE, byte_level_tokenizer, save_tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_enum("family", "mixtral", MODEL_FAMILIES, "Model family (HF model_type).")
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("seed", 0, "torch seed of the random weights.")
  flags.DEFINE_float("init_std", 0.05, "Std of the random weights (HF initializer_range).")
  flags.DEFINE_integer("num_shards", 1, "Split the weights into about this many "
                       "safetensors shards (>1 also writes the index file).")
  flags.DEFINE_multi_string("override", [], "ModelConfig field=value (int, float or "
                            "JSON), e.g. num_layers=4.")


def make_tiny_checkpoint(family: str, out_dir: str, *, seed: int = 0, init_std: float = 0.05,
                         num_shards: int = 1, hf_fields: dict[str, Any] | None = None,
                         **overrides: Any) -> str:
  """Writes the tiny `family` checkpoint (and its byte-level tokenizer) to `out_dir`; returns it.

  `overrides` change the tiny `ModelConfig`; `hf_fields` are set on its config.json fields
  before transformers builds the model (what a ModelConfig does not export, e.g. YaRN's
  rope_parameters).
  """
  import torch
  import transformers

  cfg = tiny_config(family, **overrides)
  hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(cfg) | (hf_fields or {}),
                                             initializer_range=init_std, pad_token_id=0)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
  with torch.no_grad():  # HF initialises DeepSeek-V3's routing correction bias to zeros
    for name, buffer in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        buffer.normal_(0.0, 2 * init_std)
  os.makedirs(out_dir, exist_ok=True)
  total = sum(p.numel() * p.element_size() for p in model.parameters())
  shard = f"{max(1, total // num_shards // 1000 + 1)}KB" if num_shards > 1 else "10GB"
  model.save_pretrained(out_dir, max_shard_size=shard)
  if cfg.vocab_size >= MIN_VOCAB_SIZE:
    save_tokenizer(byte_level_tokenizer(cfg.vocab_size), out_dir)
  return out_dir


def _parse(value: str) -> Any:
  try:
    return json.loads(value)
  except json.JSONDecodeError:
    return value


def main(argv: Sequence[str]) -> None:
  del argv
  overrides = {}
  for item in FLAGS.override:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--override expects field=value, got {item!r}")
    overrides[key] = _parse(value)
    if isinstance(overrides[key], list):
      overrides[key] = tuple(overrides[key])
  out = make_tiny_checkpoint(FLAGS.family, FLAGS.out, seed=FLAGS.seed,
                             init_std=FLAGS.init_std, num_shards=FLAGS.num_shards, **overrides)
  print(json.dumps({"checkpoint": out, "files": sorted(os.listdir(out))}))


if __name__ == "__main__":
  define_flags()
  run_script(main)
