"""crosspool_jax: a weights pool and a KV-cache pool for serving many cold MoE models."""
