"""Bytes of a model's parameters by where they live, and of its KV per token.

Counted from the `ModelConfig` alone (no arrays), so the policies plan paper-scale fleets from
their public config.json; `tests/capacity` checks the counts against real parameter trees.
"""

from __future__ import annotations

import numpy as np

from crosspool_jax.models.config import ModelConfig, attention_matrices


def dtype_itemsize(dtype: str) -> int:
  """Bytes per element of a dtype name ("bfloat16", "float32", "float8_e4m3fn", ...)."""
  try:
    return np.dtype(dtype).itemsize
  except TypeError:
    import ml_dtypes  # registers bfloat16 / float8 names with numpy

    return np.dtype(getattr(ml_dtypes, dtype)).itemsize


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts of a model by where they live.

  Returns:
    {"attention": q/k/v/o (+ biases, q/k norms; or latent attention's projections and norms)
       and the two RMSNorms of every layer,
     "embedding": embedding, LM head (unless tied), final norm,
     "router": routers of the MoE layers (+ their correction biases),
     "dense_ffn": shared experts (+ their gates) and the MLPs of dense layers,
     "routed_experts": the routed experts,
     "non_expert": all but the routed experts, "total"}.
  """
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = attention_matrices(cfg) + 2 * d
  if cfg.mla:  # the latent row's norm and q LoRA's
    attn += cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
  if cfg.qkv_bias:
    attn += n * h + 2 * k * h
  if cfg.qk_norm == "per_head":
    attn += 2 * h
  elif cfg.qk_norm == "full":
    attn += (n + k) * h
  moe = sum(cfg.moe_layers)
  dense = cfg.num_layers - moe
  router = d * cfg.num_experts + (cfg.num_experts if cfg.topk_method == "noaux_tc" else 0)
  shared = 3 * d * cfg.d_ff_shared + (d if cfg.shared_gate else 0) if cfg.d_ff_shared else 0
  out = {
      "attention": cfg.num_layers * attn,
      "embedding": cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d,
      "router": moe * router,
      "dense_ffn": moe * shared + dense * 3 * d * cfg.d_ff_dense,
      "routed_experts": moe * cfg.num_experts * 3 * d * cfg.d_ff_expert,
  }
  out["non_expert"] = out["attention"] + out["embedding"] + out["router"] + out["dense_ffn"]
  out["total"] = out["non_expert"] + out["routed_experts"]
  return out


def param_bytes(cfg: ModelConfig, dtype: str) -> dict[str, int]:
  """`param_counts` in bytes of `dtype`."""
  size = dtype_itemsize(dtype)
  return {key: v * size for key, v in param_counts(cfg).items()}


def kv_bytes_per_token(cfg: ModelConfig, dtype: str) -> int:
  """What one token caches over all layers: K and V of `num_kv_heads` heads, or with latent
  attention one row of kv_lora_rank + qk_rope_head_dim (the cache's one KV head, no V)."""
  return cfg.kv_stores * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_itemsize(dtype)
