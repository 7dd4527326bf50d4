"""Pure functions of (params, arrays): the math the per-layer stages (`stages.py`) are made of.

Params are plain dicts of arrays (`nnx.to_pure_dict` of the NNX modules in `model.py`).

Names end in their axes, one letter each (`x_TD`: [tokens, d_model]); the glossary of every
letter, with the letters that current names use twice, is in WORKSPACE.md, "Shape suffixes".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crosspool_jax.models.config import LATENT_NORM_EPS, ModelConfig

Params = dict


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in f32 and cast back, as HF does."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w * x32.astype(x.dtype)


def rope(x_TXH: jax.Array, positions_T: jax.Array, theta: float, *,
         interleave: bool = False,
         yarn: tuple[float, float, float, float] | None = None) -> jax.Array:
  """Rotary embedding of x [..., T, heads, H] at integer positions [..., T].

  Frequency i rotates the pair (x[i], x[i + H/2]) (rotate-half layout), or with `interleave`
  the pair (x[2i], x[2i + 1]) (DeepSeek), each rotated pair left where it was. `yarn`: YaRN's
  frequencies and cos/sin factor (`ModelConfig.rope_yarn`).
  """
  h = x_TXH.shape[-1]
  inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if yarn is not None:
    factor, low, high, attention_factor = yarn
    ramp_H2 = jnp.clip((jnp.arange(h // 2, dtype=jnp.float32) - low)
                       / (high - low if high != low else 0.001), 0, 1)
    inv_freq_H2 = inv_freq_H2 / factor * ramp_H2 + inv_freq_H2 * (1 - ramp_H2)
  angles_TH2 = positions_T.astype(jnp.float32)[..., None] * inv_freq_H2
  x32 = x_TXH.astype(jnp.float32)
  if yarn is not None:
    x32 = x32 * attention_factor
  if interleave:
    cos, sin = jnp.cos(angles_TH2)[..., None, :], jnp.sin(angles_TH2)[..., None, :]
    pairs = x32.reshape(*x32.shape[:-1], h // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.reshape(x_TXH.shape).astype(x_TXH.dtype)
  angles_TH = jnp.concatenate([angles_TH2, angles_TH2], axis=-1)[..., None, :]
  cos, sin = jnp.cos(angles_TH), jnp.sin(angles_TH)
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


def latent_qkv(p: Params, x_TD: jax.Array, positions_T: jax.Array, cfg: ModelConfig):
  """Latent attention's inputs: the query [T, N, qk_nope + qk_rope] (its rope part rotated) and
  the latent row a token caches, [T, 1, kv_lora_rank + qk_rope] as one KV head: the normed
  compressed c_kv, then the rotated key shared by all heads.

  Leading batch axes are allowed: x [..., T, D], positions [..., T].
  """
  if cfg.q_lora_rank is None:
    q_TNH = jnp.einsum("...d,dnh->...nh", x_TD, p["w_q_DNH"])
  else:
    c_q_TA = rms_norm(x_TD @ p["w_q_a_DA"], p["q_a_norm_A"], LATENT_NORM_EPS)
    q_TNH = jnp.einsum("...a,anh->...nh", c_q_TA, p["w_q_b_ANH"])
  nope = cfg.qk_nope_head_dim
  q_rope_TNH = rope(q_TNH[..., nope:], positions_T, cfg.rope_theta,
                    interleave=cfg.rope_interleave, yarn=cfg.rope_yarn)
  kv_TH = x_TD @ p["w_kv_a_DH"]
  c_kv_TA = rms_norm(kv_TH[..., : cfg.kv_lora_rank], p["kv_a_norm_A"], LATENT_NORM_EPS)
  k_rope_TKH = rope(kv_TH[..., None, cfg.kv_lora_rank:], positions_T, cfg.rope_theta,
                    interleave=cfg.rope_interleave, yarn=cfg.rope_yarn)
  q_TNH = jnp.concatenate([q_TNH[..., :nope], q_rope_TNH], axis=-1)
  return q_TNH, jnp.concatenate([c_kv_TA[..., None, :], k_rope_TKH], axis=-1)


def attend_latent(q_BTNH: jax.Array, cache_BKCH: jax.Array, w_kv_b_ANH: jax.Array,
                  q_positions_BT: jax.Array, cfg: ModelConfig, *, absorbed: bool) -> jax.Array:
  """Causal latent attention of queries [B, T, N, qk_nope + qk_rope] over a latent cache
  [B, 1, C, kv_lora_rank + qk_rope]; returns the heads' values [B, T, N, v_head_dim].

  Expanded form: each head's key (c_kv @ W_UK, then the shared rotary key) and value
  (c_kv @ W_UV) over the cache, then attention as any family's. Absorbed form (decode): the
  query's non-rotary part is taken into the latent space (q_nope @ W_UK^T), attention runs over
  the cached rows as they lie (one KV head, the latent part as the value), and the result
  leaves through W_UV; the same numbers to float rounding, without a per-head key or value.
  `w_kv_b_ANH` is [kv_lora_rank, N, qk_nope + v_head_dim]: W_UK then W_UV.
  """
  nope, rank = cfg.qk_nope_head_dim, cfg.kv_lora_rank
  if absorbed:
    o_BTNA = attend_contiguous(absorb_query(q_BTNH, w_kv_b_ANH, cfg), cache_BKCH,
                               cache_BKCH[..., :rank], q_positions_BT, scale=cfg.attn_scale)
    return latent_values(o_BTNA, w_kv_b_ANH, cfg)
  w_uk_ANH, w_uv_ANH = w_kv_b_ANH[..., :nope], w_kv_b_ANH[..., nope:]
  c_BCA, k_rope_B1CH = cache_BKCH[:, 0, :, :rank], cache_BKCH[..., rank:]
  k_nope_BNCH = jnp.einsum("bca,anh->bnch", c_BCA, w_uk_ANH)
  v_BNCH = jnp.einsum("bca,anh->bnch", c_BCA, w_uv_ANH)
  k_rope_BNCH = jnp.broadcast_to(k_rope_B1CH, (*k_nope_BNCH.shape[:-1], k_rope_B1CH.shape[-1]))
  k_BNCH = jnp.concatenate([k_nope_BNCH, k_rope_BNCH], axis=-1)
  return attend_contiguous(q_BTNH, k_BNCH, v_BNCH, q_positions_BT, scale=cfg.attn_scale)


def absorb_query(q_TNH: jax.Array, w_kv_b_ANH: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Latent attention's query in the absorbed form: [..., N, qk_nope + qk_rope] ->
  [..., N, kv_lora_rank + qk_rope] (q_nope @ W_UK^T, then q_rope), the width of a cached row."""
  nope = cfg.qk_nope_head_dim
  q_lat_TNA = jnp.einsum("...nh,anh->...na", q_TNH[..., :nope], w_kv_b_ANH[..., :nope])
  return jnp.concatenate([q_lat_TNA, q_TNH[..., nope:]], axis=-1)


def latent_values(o_TNA: jax.Array, w_kv_b_ANH: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The absorbed form's attention output, in the latent space [..., N, kv_lora_rank], out
  through W_UV: [..., N, v_head_dim]."""
  return jnp.einsum("...na,anh->...nh", o_TNA, w_kv_b_ANH[..., cfg.qk_nope_head_dim:])


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


def route(p_ffn: Params, x_TD: jax.Array, cfg: ModelConfig):
  """Router of a MoE layer's params (`cfg.topk_method`, f32 scores), top-k, optional
  renormalisation of the k weights, routed scaling.

  Returns (topk_ids_TK int32, topk_weights_TK f32).
  """
  return route_logits(router_logits(p_ffn["w_router_DE"], x_TD), cfg,
                      p_ffn.get("router_bias_E"))


def route_logits(logits_TE: jax.Array, cfg: ModelConfig, bias_E: jax.Array | None = None):
  """`route` from the router's logits: (topk_ids_TK int32, topk_weights_TK f32).

  greedy: the top-k softmax probabilities. group_limited_greedy: the top-k among the experts of
  the `topk_group` groups with the highest best probability (the others scored 0). noaux_tc:
  sigmoid scores; the choice by score + `bias_E` (the correction bias) among the experts of the
  `topk_group` groups with the highest sum of their two best biased scores (the others -inf),
  the weights the chosen experts' unbiased scores.
  """
  if cfg.topk_method == "noaux_tc":
    if bias_E is None:
      raise ValueError("noaux_tc routing chooses by score + the correction bias: give bias_E")
    scores_TE = jax.nn.sigmoid(logits_TE)
    choice_TE = _limit_groups(scores_TE + bias_E.astype(jnp.float32), cfg, -jnp.inf)
    ids_TK = jax.lax.top_k(choice_TE, cfg.top_k)[1]
    weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=-1)
  else:
    scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    if cfg.topk_method == "group_limited_greedy":
      scores_TE = _limit_groups(scores_TE, cfg, 0.0)
    weights_TK, ids_TK = jax.lax.top_k(scores_TE, cfg.top_k)
  if cfg.norm_topk_prob:
    denominator_TK = jnp.sum(weights_TK, axis=-1, keepdims=True)
    if cfg.topk_method == "noaux_tc":
      denominator_TK = denominator_TK + 1e-20
    weights_TK = weights_TK / denominator_TK
  if cfg.routed_scaling_factor != 1.0:
    weights_TK = weights_TK * cfg.routed_scaling_factor
  return ids_TK.astype(jnp.int32), weights_TK


def _limit_groups(scores_TE: jax.Array, cfg: ModelConfig, fill: float) -> jax.Array:
  """`scores_TE` with the experts outside each token's `topk_group` best groups set to `fill`.

  A group's score is its best expert's (group_limited_greedy) or the sum of its best two
  (noaux_tc).
  """
  grouped_TGE = scores_TE.reshape(*scores_TE.shape[:-1], cfg.n_group, -1)
  if cfg.topk_method == "noaux_tc":
    group_TG = jnp.sum(jax.lax.top_k(grouped_TGE, 2)[0], axis=-1)
  else:
    group_TG = jnp.max(grouped_TGE, axis=-1)
  groups_TK = jax.lax.top_k(group_TG, cfg.topk_group)[1]
  keep_TG = jnp.any(groups_TK[..., None] == jnp.arange(cfg.n_group), axis=-2)
  return jnp.where(keep_TG[..., None], grouped_TGE, fill).reshape(scores_TE.shape)


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
  """y + sigmoid(x @ gate) * SwiGLU_shared(x) if the family has a shared expert (without the
  gate where it has none), else y."""
  if not cfg.d_ff_shared:
    return y_TD
  if cfg.shared_gate:
    gate_T1 = jax.nn.sigmoid((x_TD @ p["shared_gate_D1"]).astype(jnp.float32))
  shared_TD = swiglu(x_TD, p["shared_w_gate_DF"], p["shared_w_up_DF"], p["shared_w_down_FD"])
  if not cfg.shared_gate:
    return y_TD + shared_TD.astype(y_TD.dtype)
  return y_TD + (gate_T1 * shared_TD).astype(y_TD.dtype)


def attend_contiguous(q_BTNH: jax.Array, k_BKCH: jax.Array, v_BKCH: jax.Array,
                      q_positions_BT: jax.Array, *, scale: float | None = None) -> jax.Array:
  """Causal GQA attention of queries at `q_positions` over a contiguous cache.

  The cache is [B, K, C, H] (kv heads before positions) and both products are plain matmuls
  batched over (B, K) with the cache as their right operand as it lies: the G * T queries of a
  kv head are rows (a transposed copy of the small q and output, never of K or V). Query at
  position p sees cache positions j <= p (every such position was written by this sequence).
  Softmax in f32, scores times `scale` (default 1 / sqrt(H)). The values' head dim may differ
  from the keys' (latent attention). Queries with negative positions (padding) get finite
  garbage.
  """
  b, t, n, h = q_BTNH.shape
  kv, c, hv = k_BKCH.shape[1], k_BKCH.shape[2], v_BKCH.shape[3]
  g = n // kv
  q_BKQH = q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  scores_BKGTC = jnp.einsum("bkqh,bkch->bkqc", q_BKQH, k_BKCH,
                            preferred_element_type=jnp.float32).reshape(b, kv, g, t, c)
  visible_BTC = jnp.arange(c)[None, None, :] <= q_positions_BT[:, :, None]
  scale = h ** -0.5 if scale is None else scale
  scores_BKGTC = jnp.where(visible_BTC[:, None, None], scores_BKGTC * scale, -1e30)
  probs_BKQC = jax.nn.softmax(scores_BKGTC, axis=-1).astype(v_BKCH.dtype).reshape(b, kv, g * t, c)
  o_BKQH = jnp.einsum("bkqc,bkch->bkqh", probs_BKQC, v_BKCH)
  return o_BKQH.reshape(b, kv, g, t, hv).transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv)


def lm_head(params: Params, x_TD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Final norm and projection to f32 logits [..., V]."""
  x_TD = rms_norm(x_TD, params["final_norm_D"], cfg.rms_eps)
  if cfg.tie_embeddings:
    logits = jnp.einsum("...d,vd->...v", x_TD, params["embed_VD"])
  else:
    logits = x_TD @ params["lm_head_DV"]
  return logits.astype(jnp.float32)
