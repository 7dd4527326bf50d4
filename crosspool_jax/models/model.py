"""Flax NNX definition of the MoE transformer and its contiguous-cache forward pass.

The NNX modules define the parameters (names, shapes, initialisers). Hot paths never call
the modules: `nnx.split` once, `nnx.to_pure_dict` the state, and pass that dict to the pure
stages (`stages.py`) under a plain `jax.jit`; `forward` composes them over a `KVCache`,
`forward_train` over whole sequences with no cache (training).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crosspool_jax.models import stages
from crosspool_jax.models.config import ModelConfig


def _param(rngs: nnx.Rngs, shape, dtype, scale: float = 0.02) -> nnx.Param:
  """N(0, scale^2) weights seeded from the NNX `params` stream.

  The draw itself uses numpy: a `jax.random.normal` per parameter shape costs one XLA
  compilation each (~0.5 s on a small CPU), i.e. seconds per tiny model.
  """
  key = rngs.params()
  if isinstance(key, jax.core.Tracer):  # abstract init (nnx.eval_shape): values unused
    return nnx.Param(jnp.zeros(shape, dtype))
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  return nnx.Param(jnp.asarray(scale * rng.standard_normal(shape, np.float32), dtype))


def _ones(shape, dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype))


class Attention(nnx.Module):
  """GQA attention projections (+ optional q/k bias, q/k RMSNorm)."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    if cfg.mla:
      self._init_latent(cfg, dtype, rngs)
      return
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.w_q_DNH = _param(rngs, (d, n, h), dtype)
    self.w_k_DKH = _param(rngs, (d, k, h), dtype)
    self.w_v_DKH = _param(rngs, (d, k, h), dtype)
    self.w_o_NHD = _param(rngs, (n, h, d), dtype)
    if cfg.qkv_bias:
      self.b_q_NH = _param(rngs, (n, h), dtype)
      self.b_k_KH = _param(rngs, (k, h), dtype)
      self.b_v_KH = _param(rngs, (k, h), dtype)
    if cfg.qk_norm == "per_head":
      self.q_norm, self.k_norm = _ones((h,), dtype), _ones((h,), dtype)
    elif cfg.qk_norm == "full":
      self.q_norm, self.k_norm = _ones((n * h,), dtype), _ones((k * h,), dtype)

  def _init_latent(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    """Latent attention: the query (one projection, or q LoRA: down, RMSNorm, up), the latent
    row's projection (c_kv, then the shared rotary key), its RMSNorm, the up-projection of c_kv
    to each head's key (no rope part) and value, the output projection."""
    d, n, a = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
      self.w_q_DNH = _param(rngs, (d, n, cfg.qk_head_dim), dtype)
    else:
      self.w_q_a_DA = _param(rngs, (d, cfg.q_lora_rank), dtype)
      self.q_a_norm_A = _ones((cfg.q_lora_rank,), dtype)
      self.w_q_b_ANH = _param(rngs, (cfg.q_lora_rank, n, cfg.qk_head_dim), dtype)
    self.w_kv_a_DH = _param(rngs, (d, cfg.head_dim), dtype)
    self.kv_a_norm_A = _ones((a,), dtype)
    self.w_kv_b_ANH = _param(rngs, (a, n, cfg.qk_nope_head_dim + cfg.v_head_dim), dtype)
    self.w_o_NHD = _param(rngs, (n, cfg.v_head_dim, d), dtype)


class MoE(nnx.Module):
  """Router (+ the correction bias of noaux_tc routing), routed SwiGLU experts [E, ...],
  optional shared expert (sigmoid-gated or not)."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, e, f = cfg.d_model, cfg.num_experts, cfg.d_ff_expert
    self.w_router_DE = _param(rngs, (d, e), dtype)
    if cfg.topk_method == "noaux_tc":
      self.router_bias_E = _param(rngs, (e,), dtype)
    self.w_gate_EDF = _param(rngs, (e, d, f), dtype)
    self.w_up_EDF = _param(rngs, (e, d, f), dtype)
    self.w_down_EFD = _param(rngs, (e, f, d), dtype)
    if cfg.d_ff_shared:
      fs = cfg.d_ff_shared
      self.shared_w_gate_DF = _param(rngs, (d, fs), dtype)
      self.shared_w_up_DF = _param(rngs, (d, fs), dtype)
      self.shared_w_down_FD = _param(rngs, (fs, d), dtype)
      if cfg.shared_gate:
        self.shared_gate_D1 = _param(rngs, (d, 1), dtype)


class DenseMLP(nnx.Module):
  """SwiGLU MLP of the dense layers some families interleave."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff_dense
    self.w_gate_DF = _param(rngs, (d, f), dtype)
    self.w_up_DF = _param(rngs, (d, f), dtype)
    self.w_down_FD = _param(rngs, (f, d), dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
    self.attn_norm_D = _ones((cfg.d_model,), dtype)
    self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.ffn_norm_D = _ones((cfg.d_model,), dtype)
    ffn_cls = MoE if cfg.moe_layers[layer] else DenseMLP
    self.ffn = ffn_cls(cfg, dtype=dtype, rngs=rngs)


class MoETransformer(nnx.Module):
  """Decoder-only MoE transformer: embed, L x [norm, attention, norm, FFN], norm, LM head."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_VD = _param(rngs, (cfg.vocab_size, cfg.d_model), dtype)
    self.layers = nnx.List(
        [DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm_D = _ones((cfg.d_model,), dtype)
    if not cfg.tie_embeddings:
      self.lm_head_DV = _param(rngs, (cfg.d_model, cfg.vocab_size), dtype)


def init_params(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32) -> dict:
  """Random parameters (a pure dict) for `cfg`, seeded."""
  model = MoETransformer(cfg, dtype=dtype, rngs=nnx.Rngs(params=seed))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: ModelConfig, *, dtype=jnp.float32) -> dict:
  """ShapeDtypeStructs of the params of `cfg` (no allocation): the target of restores."""
  model = nnx.eval_shape(lambda: MoETransformer(cfg, dtype=dtype, rngs=nnx.Rngs(params=0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Contiguous per-sequence cache: the reference layout (the pools use pages instead).

  One array per layer, not a stacked [L, ...] one: a layer's slice of a stacked cache is a
  copy on XLA:CPU, every layer of every step. Kv heads come before positions, so attention
  reads a layer's cache as it lies (`layers.attend_contiguous`). With latent attention a layer
  caches one row per token as its one KV head, [B, 1, C, kv_lora_rank + qk_rope_head_dim] (the
  normed latent c_kv, then the rotated shared key) in `k_LBKCH`, and `v_LBKCH` is empty.
  """

  k_LBKCH: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]
  v_LBKCH: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]; () if MLA

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return cls(*_zero_layers(cfg.num_layers, cfg.kv_stores, shape, jnp.dtype(dtype)),
               *(((),) if cfg.mla else ()))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zero_layers(num_layers: int, stores: int, shape: tuple[int, ...], dtype):
  """Zeros of `num_layers` layers for each of `stores` stores (K and V, or latent rows), in
  one dispatch."""
  return tuple(tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)) for _ in range(stores))


def write_and_attend_layer(cache: KVCache, layer: int, p: dict, q_TNH: jax.Array,
                           k_TKH: jax.Array, v_TKH: jax.Array | None, positions_BT: jax.Array,
                           *, cfg: ModelConfig, absorbed: bool | None = None
                           ) -> tuple[jax.Array, KVCache]:
  """Layer `layer`'s write and attention on the reference cache in either layout: K and V
  (`stages.write_and_attend_contiguous`) or latent rows (`stages.write_and_attend_latent`, in
  the absorbed form for one token per row unless `absorbed` says). Returns (out_TNH, cache)."""
  k_LBKCH, v_LBKCH = list(cache.k_LBKCH), list(cache.v_LBKCH)
  if cfg.mla:
    o_TNH, k_LBKCH[layer] = stages.write_and_attend_latent(
        k_LBKCH[layer], q_TNH, k_TKH, p["attn"]["w_kv_b_ANH"], positions_BT, cfg=cfg,
        absorbed=positions_BT.shape[1] == 1 if absorbed is None else absorbed)
  else:
    o_TNH, k_LBKCH[layer], v_LBKCH[layer] = stages.write_and_attend_contiguous(
        k_LBKCH[layer], v_LBKCH[layer], q_TNH, k_TKH, v_TKH, positions_BT)
  return o_TNH, KVCache(tuple(k_LBKCH), tuple(v_LBKCH))


@functools.partial(jax.jit, static_argnames=("cfg", "moe_impl", "absorbed"),
                   donate_argnames=("cache",))
def forward(params: dict, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache,
            last_B: jax.Array | None = None, *, cfg: ModelConfig,
            moe_impl: str | None = None, absorbed: bool | None = None
            ) -> tuple[jax.Array, KVCache]:
  """Runs tokens through the model on a contiguous KV cache (the reference forward pass).

  Args:
    params: pure param dict (`init_params`, `load_hf_checkpoint`, `restore_params`).
    tokens_BT: int32 token ids. Latent attention runs in the absorbed form for one token per
      row (decode) and in the expanded form for more (prefill), unless `absorbed` says.
    positions_BT: int32 position of each token in its sequence; -1 marks padding (its K/V is
      not written, its logits are garbage).
    cache: contiguous cache, donated and returned updated.
    last_B: optional int32 [B]: the head runs on token last_B[b] of each row only (a prefill
      needs the last prompt token's logits, not the [B, T, V] of every token).
    cfg: model config (static).
    moe_impl: expert dispatch implementation.
    absorbed: latent attention's form (None: by the tokens per row, above); ignored by the
      other families.

  Returns:
    (logits_BTV f32, or logits_BV of the `last_B` tokens; updated cache).
  """
  b, t = tokens_BT.shape
  positions_T = positions_BT.reshape(-1)
  x_TD, valid_T = stages.embed(params["embed_VD"], tokens_BT.reshape(-1), positions_T)
  for i in range(cfg.num_layers):
    p = params["layers"][i]
    q_TNH, k_TKH, v_TKH = stages.attention_inputs(p, x_TD, positions_T, cfg=cfg)
    o_TNH, cache = write_and_attend_layer(cache, i, p, q_TNH, k_TKH, v_TKH, positions_BT,
                                          cfg=cfg, absorbed=absorbed)
    x_TD = stages.finish_layer(p, x_TD, [o_TNH], None, valid_T, cfg=cfg,
                               moe=cfg.moe_layers[i], impl=moe_impl)
  if last_B is not None:
    return stages.head(params, x_TD, jnp.arange(b) * t + last_B, cfg=cfg), cache
  return stages.head(params, x_TD, None, cfg=cfg).reshape(b, t, -1), cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_train(params: dict, tokens_BT: jax.Array, *, cfg: ModelConfig
                  ) -> tuple[jax.Array, jax.Array]:
  """The forward pass of training: whole sequences from position 0, no cache, differentiable.

  The same logits as `forward` on an empty cache (every expert is computed densely and
  weighted by the router's top-k choice, `stages.train_layer`).

  Args:
    params: pure param dict.
    tokens_BT: int32 token ids, each row a sequence from its start.
    cfg: model config (static).

  Returns:
    (logits_BTV f32, router logits [MoE layers, B x T, E] f32), the router logits in layer
    order over the MoE layers only (HF's `router_logits`).
  """
  b, t = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x_TD, _ = stages.embed(params["embed_VD"], tokens_BT.reshape(-1), positions_BT.reshape(-1))
  router_logits = []
  for i in range(cfg.num_layers):
    x_TD, logits_TE = stages.train_layer(params["layers"][i], x_TD, positions_BT, cfg=cfg,
                                         moe=cfg.moe_layers[i])
    if logits_TE is not None:
      router_logits.append(logits_TE)
  logits_BTV = stages.head(params, x_TD, None, cfg=cfg).reshape(b, t, -1)
  return logits_BTV, jnp.stack(router_logits)
