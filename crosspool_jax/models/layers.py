"""Pure functions of (params, arrays): the math the per-layer stages (`stages.py`) are made of.

Params are plain dicts of arrays (`nnx.to_pure_dict` of the NNX modules in `model.py`).

Names end in their axes, one letter each (`x_TD`: [tokens, d_model]); the glossary of every
letter, with the letters that current names use twice, is in WORKSPACE.md, "Shape suffixes".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crosspool_jax.models.config import ModelConfig

Params = dict


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in f32 and cast back, as HF does."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w * x32.astype(x.dtype)


def rope(x_TXH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half layout) of x [..., T, heads, H] at integer positions [..., T]."""
  h = x_TXH.shape[-1]
  inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles_TH2 = positions_T.astype(jnp.float32)[..., None] * inv_freq_H2
  angles_TH = jnp.concatenate([angles_TH2, angles_TH2], axis=-1)[..., None, :]
  cos, sin = jnp.cos(angles_TH), jnp.sin(angles_TH)
  x32 = x_TXH.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_TXH.dtype)


def attention_qkv(p: Params, x_TD: jax.Array, positions_T: jax.Array, cfg: ModelConfig):
  """Projects the (normed) residual to rotated q [T, N, H], k [T, K, H] and v [T, K, H].

  Leading batch axes are allowed: x [..., T, D], positions [..., T].
  """
  q_TNH = jnp.einsum("...d,dnh->...nh", x_TD, p["w_q_DNH"])
  k_TKH = jnp.einsum("...d,dkh->...kh", x_TD, p["w_k_DKH"])
  v_TKH = jnp.einsum("...d,dkh->...kh", x_TD, p["w_v_DKH"])
  if cfg.qkv_bias:
    q_TNH, k_TKH, v_TKH = q_TNH + p["b_q_NH"], k_TKH + p["b_k_KH"], v_TKH + p["b_v_KH"]
  if cfg.qk_norm == "per_head":
    q_TNH = rms_norm(q_TNH, p["q_norm"], cfg.rms_eps)
    k_TKH = rms_norm(k_TKH, p["k_norm"], cfg.rms_eps)
  elif cfg.qk_norm == "full":
    q_TNH = rms_norm(q_TNH.reshape(*q_TNH.shape[:-2], -1), p["q_norm"], cfg.rms_eps
                     ).reshape(q_TNH.shape)
    k_TKH = rms_norm(k_TKH.reshape(*k_TKH.shape[:-2], -1), p["k_norm"], cfg.rms_eps
                     ).reshape(k_TKH.shape)
  if cfg.clip_qkv is not None:
    c = cfg.clip_qkv
    q_TNH, k_TKH, v_TKH = (jnp.clip(a, -c, c) for a in (q_TNH, k_TKH, v_TKH))
  q_TNH = rope(q_TNH, positions_T, cfg.rope_theta)
  k_TKH = rope(k_TKH, positions_T, cfg.rope_theta)
  return q_TNH, k_TKH, v_TKH


def attention_out(p: Params, o_TNH: jax.Array) -> jax.Array:
  """Output projection [..., T, N, H] -> [..., T, D].

  One matmul over N·H in the order both operands lie in (a free reshape): as the einsum
  "...nh,nhd->...d", XLA:CPU contracted (h, n) and copied the output and the weight
  transposed for it, the weight on every decode step.
  """
  n, h, d = p["w_o_NHD"].shape
  return o_TNH.reshape(*o_TNH.shape[:-2], n * h) @ p["w_o_NHD"].reshape(n * h, d)


def swiglu(x_TD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array,
           w_down_FD: jax.Array) -> jax.Array:
  """(silu(x @ w_gate) * (x @ w_up)) @ w_down."""
  h_TF = jax.nn.silu(x_TD @ w_gate_DF) * (x_TD @ w_up_DF)
  return h_TF @ w_down_FD


def router_logits(w_router_DE: jax.Array, x_TD: jax.Array) -> jax.Array:
  """The router's f32 logits [T, E] (what HF's load-balancing loss reads)."""
  return (x_TD @ w_router_DE).astype(jnp.float32)


def route(w_router_DE: jax.Array, x_TD: jax.Array, cfg: ModelConfig):
  """Router: softmax over all experts (f32), top-k, optional renormalisation of the k weights.

  Returns (topk_ids_TK int32, topk_weights_TK f32).
  """
  return route_logits(router_logits(w_router_DE, x_TD), cfg)


def route_logits(logits_TE: jax.Array, cfg: ModelConfig):
  """`route` from the router's logits: (topk_ids_TK int32, topk_weights_TK f32)."""
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  weights_TK, ids_TK = jax.lax.top_k(probs_TE, cfg.top_k)
  if cfg.norm_topk_prob:
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return ids_TK.astype(jnp.int32), weights_TK


def dense_experts(h_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
                  w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array) -> jax.Array:
  """The routed experts' weighted sum [T, D] computed densely: every expert on every token,
  each token's outputs combined with its top-k weights (0 for the experts it did not pick).

  The same sum as the expert dispatch (`stages.routed_experts`), differentiable in the
  weights and the router (the training path); it costs E / top_k times the dispatch's FLOPs.
  """
  combine_TE = jnp.sum(jax.nn.one_hot(ids_TK, w_gate_EDF.shape[0], dtype=weights_TK.dtype)
                       * weights_TK[..., None], axis=-2)
  gate_ETF = jnp.einsum("td,edf->etf", h_TD, w_gate_EDF)
  up_ETF = jnp.einsum("td,edf->etf", h_TD, w_up_EDF)
  out_ETD = jnp.einsum("etf,efd->etd", jax.nn.silu(gate_ETF) * up_ETF, w_down_EFD)
  return jnp.einsum("te,etd->td", combine_TE.astype(out_ETD.dtype), out_ETD)


def add_shared_expert(p: Params, x_TD: jax.Array, y_TD: jax.Array, cfg: ModelConfig):
  """y + sigmoid(x @ gate) * SwiGLU_shared(x) if the family has a shared expert, else y."""
  if not cfg.d_ff_shared:
    return y_TD
  gate_T1 = jax.nn.sigmoid((x_TD @ p["shared_gate_D1"]).astype(jnp.float32))
  shared_TD = swiglu(x_TD, p["shared_w_gate_DF"], p["shared_w_up_DF"], p["shared_w_down_FD"])
  return y_TD + (gate_T1 * shared_TD).astype(y_TD.dtype)


def attend_contiguous(q_BTNH: jax.Array, k_BKCH: jax.Array, v_BKCH: jax.Array,
                      q_positions_BT: jax.Array) -> jax.Array:
  """Causal GQA attention of queries at `q_positions` over a contiguous cache.

  The cache is [B, K, C, H] (kv heads before positions) and both products are plain matmuls
  batched over (B, K) with the cache as their right operand as it lies: the G * T queries of a
  kv head are rows (a transposed copy of the small q and output, never of K or V). Query at
  position p sees cache positions j <= p (every such position was written by this sequence).
  Softmax in f32. Queries with negative positions (padding) get finite garbage.
  """
  b, t, n, h = q_BTNH.shape
  kv, c = k_BKCH.shape[1], k_BKCH.shape[2]
  g = n // kv
  q_BKQH = q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  scores_BKGTC = jnp.einsum("bkqh,bkch->bkqc", q_BKQH, k_BKCH,
                            preferred_element_type=jnp.float32).reshape(b, kv, g, t, c)
  visible_BTC = jnp.arange(c)[None, None, :] <= q_positions_BT[:, :, None]
  scores_BKGTC = jnp.where(visible_BTC[:, None, None], scores_BKGTC * (h ** -0.5), -1e30)
  probs_BKQC = jax.nn.softmax(scores_BKGTC, axis=-1).astype(v_BKCH.dtype).reshape(b, kv, g * t, c)
  o_BKQH = jnp.einsum("bkqc,bkch->bkqh", probs_BKQC, v_BKCH)
  return o_BKQH.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def lm_head(params: Params, x_TD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Final norm and projection to f32 logits [..., V]."""
  x_TD = rms_norm(x_TD, params["final_norm_D"], cfg.rms_eps)
  if cfg.tie_embeddings:
    logits = jnp.einsum("...d,vd->...v", x_TD, params["embed_VD"])
  else:
    logits = x_TD @ params["lm_head_DV"]
  return logits.astype(jnp.float32)
