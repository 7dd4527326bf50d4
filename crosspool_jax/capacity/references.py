"""Public config.json values of real MoE checkpoints: the capacity analysis' realistic fleets.

Only the values a `ModelConfig` needs; the analysis counts bytes from them (no weights).
"""

from __future__ import annotations

from typing import Any

from crosspool_jax.models.config import ModelConfig, from_hf_config

REFERENCE_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None),
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, max_position_embeddings=8192,
        decoder_sparse_step=1, norm_topk_prob=False, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=False),
}


def reference_config(name: str) -> ModelConfig:
  """ModelConfig of a `REFERENCE_HF_CONFIGS` entry."""
  if name not in REFERENCE_HF_CONFIGS:
    raise ValueError(f"unknown reference config {name!r}; have {sorted(REFERENCE_HF_CONFIGS)}")
  return from_hf_config(REFERENCE_HF_CONFIGS[name])
