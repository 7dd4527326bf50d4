"""A trained model as a checkpoint directory the rest of the package (and transformers) loads."""

from __future__ import annotations

import os

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.hf_import import save_hf_checkpoint
from crosspool_jax.models.tokenizer import byte_level_tokenizer, save_tokenizer


def export_model(out_dir: str | os.PathLike, cfg: ModelConfig, params: dict) -> str:
  """Writes an HF checkpoint (`save_hf_checkpoint`, float32) with the byte-level
  `tokenizer.json` of its vocabulary into `out_dir`; returns the directory."""
  out_dir = save_hf_checkpoint(out_dir, cfg, params)
  save_tokenizer(byte_level_tokenizer(cfg.vocab_size), out_dir)
  return out_dir
