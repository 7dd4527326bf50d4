"""Public config.json values of real MoE checkpoints: realistic fleets with no weights.

Only the values a `ModelConfig` needs, copied from each model's published config.json; the
capacity analysis counts bytes from them and the simulator costs steps from them
(`fleet.<id>.reference` in an experiment config). DeepSeek-V2-Lite is not here yet: the pools
and policies hold its latent rows (one row of kv_lora_rank + qk_rope_head_dim per token and
layer), but the roofline's step costs, which the simulator reads, count GQA projections and
K/V reads only.
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
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        max_position_embeddings=40960, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        sliding_window=None, attention_bias=False, bos_token_id=151643, eos_token_id=151645),
    "olmoe-1b-7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
        num_experts_per_tok=8, max_position_embeddings=4096, norm_topk_prob=False,
        clip_qkv=None, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=False, eos_token_id=50279, pad_token_id=1),
}


def reference_config(name: str) -> ModelConfig:
  """ModelConfig of a `REFERENCE_HF_CONFIGS` entry."""
  if name not in REFERENCE_HF_CONFIGS:
    raise ValueError(f"unknown reference config {name!r}; have {sorted(REFERENCE_HF_CONFIGS)}")
  return from_hf_config(REFERENCE_HF_CONFIGS[name])
