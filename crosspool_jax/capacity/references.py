"""Public config.json values of real MoE checkpoints: realistic fleets with no weights.

Only the values a `ModelConfig` needs, copied from each model's published config.json; the
capacity analysis counts bytes from them and the simulator costs steps from them
(`fleet.<id>.reference` in an experiment config). DeepSeek-V2-Lite caches one latent row of
kv_lora_rank + qk_rope_head_dim per token and layer (the pools, the policies and the roofline
count that row, and its attention in the absorbed form).
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
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        scoring_func="softmax", max_position_embeddings=163840, rope_theta=10000,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                      "mscale_all_dim": 0.707}),
}


def reference_config(name: str) -> ModelConfig:
  """ModelConfig of a `REFERENCE_HF_CONFIGS` entry."""
  if name not in REFERENCE_HF_CONFIGS:
    raise ValueError(f"unknown reference config {name!r}; have {sorted(REFERENCE_HF_CONFIGS)}")
  return from_hf_config(REFERENCE_HF_CONFIGS[name])
