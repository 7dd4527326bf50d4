"""The per-layer stages of the MoE transformer: every forward path composes these.

A layer is `attention_inputs`, a KV write + attention over a store (`write_and_attend_paged`:
one device's page pool, a partial with its LSE, K and V or latent rows (latent attention in the
absorbed form: `absorbed`, below); `write_and_attend_contiguous`: the reference's
contiguous cache; `write_and_attend_latent`: its latent cache, latent attention in the expanded
or the absorbed form), `post_attention` (LSE merge of several partials, output projection,
residual, FFN norm, then the router of a MoE layer or the whole dense MLP) and, for a MoE
layer, `routed_experts` (through a slot table) and `combine`; `attention_side` is a layer up to
its experts in one program (one device's pages); `finish_layer` is the tail with the layer's
own experts; `train_layer` is a whole layer with no cache and every expert computed densely
(differentiable: the training path). Around the layers: `embed`, `head`, `head_and_sample`.
Invariant: no layer math outside this module and `layers.py`. Each stage is jitted with its
config static: an executor dispatches a stage on its own, a one-jit forward pass inlines it.
Shape suffixes: WORKSPACE.md; arrays are flat over tokens (T), the contiguous cache reshapes
to [B, T].

`absorbed` (latent attention on the page pool, every token): `attention_inputs` gives the query
absorbed into the latent space (`layers.absorb_query`), `write_and_attend_paged` attends over
the latent rows, its output (and so each device's partial) in the latent space [T, N,
kv_lora_rank], and `post_attention` takes it out through W_UV after the LSE merge (exact: W_UV
is linear), so a KV device needs none of the model's weights.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from crosspool_jax.models import layers
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.sampling import sample
from pallas_kernels.expert_dispatch import expert_dispatch
from pallas_kernels.kv_write import write_kv
from pallas_kernels.latent_paged_attention import latent_paged_attention, write_latent_rows
from pallas_kernels.ragged_paged_attention import merge_attention, ragged_paged_attention

if TYPE_CHECKING:
  from crosspool_jax.models.paged import PagedBatch


@jax.jit
def embed(embed_VD: jax.Array, tokens_T: jax.Array, positions_T: jax.Array):
  """Token embeddings [T, D] and the valid-token mask [T] (padding has a negative position)."""
  return embed_VD[tokens_T], positions_T >= 0


def _check_absorbed(cfg: ModelConfig, absorbed: bool) -> None:
  if absorbed and not cfg.mla:
    raise ValueError(f"absorbed=True is latent attention's form; a {cfg.family} model has "
                     f"none (kv_lora_rank 0)")


@functools.partial(jax.jit, static_argnames=("cfg", "absorbed"))
def attention_inputs(p: layers.Params, x_TD: jax.Array, positions_T: jax.Array, *,
                     cfg: ModelConfig, absorbed: bool = False):
  """Attention norm and rotated q [T, N, H], k [T, K, H], v [T, K, H] of one layer; with latent
  attention (q [T, N, qk_nope + qk_rope], the latent row [T, 1, kv_lora_rank + qk_rope] as k,
  None as v: `layers.latent_qkv`).

  Args:
    p: the layer's params.
    x_TD: residual stream.
    positions_T: int32 position of each token (rotary angle).
    cfg: model config.
    absorbed: latent attention only: q absorbed into the latent space, [T, N, kv_lora_rank +
      qk_rope] (`layers.absorb_query`; the page pool's form, module docstring).
  """
  _check_absorbed(cfg, absorbed)
  h_TD = layers.rms_norm(x_TD, p["attn_norm_D"], cfg.rms_eps)
  if cfg.mla:
    q_TNH, latent_TKH = layers.latent_qkv(p["attn"], h_TD, positions_T, cfg)
    if absorbed:
      q_TNH = layers.absorb_query(q_TNH, p["attn"]["w_kv_b_ANH"], cfg)
    return q_TNH, latent_TKH, None
  return layers.attention_qkv(p["attn"], h_TD, positions_T, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("pool_PE",))
def write_and_attend_paged(pool_PE: jax.Array, q_TNH: jax.Array, k_TKH: jax.Array,
                           v_TKH: jax.Array, batch: PagedBatch, layer, *, cfg: ModelConfig,
                           impl: str | None = None):
  """One layer's KV write and attention on ONE device's page pool (donated, updated in place).

  `batch` is that device's copy of the step's inputs; `layer` (an int, traced: one executable
  serves every layer) picks its slot mapping and page table inside the jit, so a layer-by-layer
  caller dispatches no slicing of its own. With a device-local table (pages elsewhere = 0) the
  result is the partial attention over this device's pages; `post_attention` merges the
  partials of several devices. Latent attention: q_TNH absorbed (`attention_inputs(absorbed=
  True)`), k_TKH the latent rows [T, 1, kv_lora_rank + qk_rope], v_TKH None; a page holds
  latent rows (`latent_paged_attention`) and the output is in the latent space.

  Returns:
    (out_TNH in the pool dtype (latent attention: [T, N, kv_lora_rank]), lse_TN f32, updated
    pool).
  """
  slots_T = jax.lax.dynamic_index_in_dim(batch.slot_mapping_LT, layer, keepdims=False)
  table_SP = jax.lax.dynamic_index_in_dim(batch.page_tables_LSP, layer, keepdims=False)
  dtype = pool_PE.dtype
  if cfg.mla:
    if q_TNH.shape[-1] != cfg.head_dim or v_TKH is not None:
      raise ValueError(f"latent attention on pages takes the absorbed query [T, N, "
                       f"{cfg.head_dim}] and no v (attention_inputs(absorbed=True)), got q "
                       f"{q_TNH.shape} and v {None if v_TKH is None else v_TKH.shape}")
    pool_PE = write_latent_rows(pool_PE, k_TKH[:, 0].astype(dtype), slots_T)
    o_TNA, lse_TN = latent_paged_attention(
        q_TNH.astype(dtype), pool_PE, table_SP, batch.cu_q_lens_S1, batch.kv_lens_S,
        batch.num_seqs_1, kv_lora_rank=cfg.kv_lora_rank, sm_scale=cfg.attn_scale, impl=impl)
    return o_TNA, lse_TN, pool_PE
  pool_PE = write_kv(pool_PE, k_TKH.astype(dtype), v_TKH.astype(dtype), slots_T, impl=impl)
  o_TNH, lse_TN = ragged_paged_attention(
      q_TNH.astype(dtype), pool_PE, table_SP, batch.cu_q_lens_S1, batch.kv_lens_S,
      batch.num_seqs_1, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, impl=impl)
  return o_TNH, lse_TN, pool_PE


@functools.partial(jax.jit, donate_argnames=("k_BKCH", "v_BKCH"))
def write_and_attend_contiguous(k_BKCH: jax.Array, v_BKCH: jax.Array, q_TNH: jax.Array,
                                k_TKH: jax.Array, v_TKH: jax.Array, positions_BT: jax.Array):
  """One layer's KV write and attention on its contiguous cache (the reference's store).

  Args:
    k_BKCH, v_BKCH: the layer's cache (donated, returned updated).
    q_TNH, k_TKH, v_TKH: the layer's rotated q/k/v, T = B x T' flattened.
    positions_BT: int32 [B, T'] positions; negative = padding (its K/V is not written).

  Returns:
    (out_TNH in the cache dtype, updated k_BKCH, updated v_BKCH).
  """
  bt = positions_BT.shape
  k_BKCH = _write_cache(k_BKCH, k_TKH.reshape(*bt, *k_TKH.shape[1:]), positions_BT)
  v_BKCH = _write_cache(v_BKCH, v_TKH.reshape(*bt, *v_TKH.shape[1:]), positions_BT)
  o_BTNH = layers.attend_contiguous(q_TNH.reshape(*bt, *q_TNH.shape[1:]), k_BKCH, v_BKCH,
                                    positions_BT)
  return o_BTNH.reshape(q_TNH.shape), k_BKCH, v_BKCH


@functools.partial(jax.jit, static_argnames=("cfg", "absorbed"), donate_argnames=("cache_BKCH",))
def write_and_attend_latent(cache_BKCH: jax.Array, q_TNH: jax.Array, latent_TKH: jax.Array,
                            w_kv_b_ANH: jax.Array, positions_BT: jax.Array, *,
                            cfg: ModelConfig, absorbed: bool):
  """One layer's latent write and latent attention on its contiguous cache (the reference's
  store of the latent-attention families): `write_and_attend_contiguous`'s counterpart.

  Args:
    cache_BKCH: the layer's latent cache [B, 1, C, kv_lora_rank + qk_rope] (donated, returned
      updated).
    q_TNH, latent_TKH: the layer's query and latent rows (`attention_inputs`), T = B x T'.
    w_kv_b_ANH: the layer's up-projection of the latent to keys and values.
    positions_BT: int32 [B, T'] positions; negative = padding (its row is not written).
    cfg: model config.
    absorbed: the absorbed form (decode) instead of the expanded one (`layers.attend_latent`).

  Returns:
    (out_TNH [T, N, v_head_dim], updated cache).
  """
  bt = positions_BT.shape
  cache_BKCH = _write_cache(cache_BKCH, latent_TKH.reshape(*bt, *latent_TKH.shape[1:]),
                            positions_BT)
  o_BTNH = layers.attend_latent(q_TNH.reshape(*bt, *q_TNH.shape[1:]), cache_BKCH, w_kv_b_ANH,
                                positions_BT, cfg, absorbed=absorbed)
  return o_BTNH.reshape(*q_TNH.shape[:-1], -1), cache_BKCH


def _write_cache(cache_BKCH, new_BTKH, positions_BT):
  """Writes one layer's new K or V at their positions; negative positions are dropped."""
  c = cache_BKCH.shape[2]
  pos_BT = jnp.where(positions_BT < 0, c, positions_BT)
  b_BT = jnp.broadcast_to(jnp.arange(cache_BKCH.shape[0])[:, None], pos_BT.shape)
  new_BTKH = new_BTKH.astype(cache_BKCH.dtype)
  # Index arrays split by the K slice: the indexed view is [B, T', K, H], as new_BTKH.
  return cache_BKCH.at[b_BT, :, pos_BT].set(new_BTKH, mode="drop")


@functools.partial(jax.jit, static_argnames=("cfg",))
def ffn_route(p: layers.Params, x_TD: jax.Array, *, cfg: ModelConfig):
  """FFN norm and router of a MoE layer: (h_TD normed, ids_TK int32, weights_TK f32)."""
  h_TD = layers.rms_norm(x_TD, p["ffn_norm_D"], cfg.rms_eps)
  return (h_TD, *layers.route(p["ffn"], h_TD, cfg))


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "absorbed"))
def post_attention(p: layers.Params, x_TD: jax.Array, outs_MTNH, lses_MTN, *,
                   cfg: ModelConfig, moe: bool, absorbed: bool = False):
  """The layer after its attention, up to the routed experts.

  Args:
    p: the layer's params (routed experts not needed).
    x_TD: residual stream before the attention.
    outs_MTNH: the attention output of each KV store holding pages of the batch (a list).
    lses_MTN: their f32 LSEs; read only to merge several partials (None with one).
    cfg: model config.
    moe: the layer is a MoE layer (else dense).
    absorbed: latent attention only: the outputs are in the latent space (the page pool's
      form), taken out through W_UV after the merge (`layers.latent_values`).

  Returns:
    MoE layer: (x_TD after attention, h_TD normed FFN input, ids_TK, weights_TK);
    dense layer: (x_TD after the whole layer,).
  """
  _check_absorbed(cfg, absorbed)
  if len(outs_MTNH) == 1:
    o_TNH = outs_MTNH[0]
  else:
    o_TNH, _ = merge_attention(outs_MTNH, lses_MTN)
  o_TNH = o_TNH.astype(x_TD.dtype)
  if absorbed:
    o_TNH = layers.latent_values(o_TNH, p["attn"]["w_kv_b_ANH"], cfg)
  x_TD = x_TD + layers.attention_out(p["attn"], o_TNH)
  if moe:
    return (x_TD, *ffn_route(p, x_TD, cfg=cfg))
  h_TD = layers.rms_norm(x_TD, p["ffn_norm_D"], cfg.rms_eps)
  f = p["ffn"]
  return (x_TD + layers.swiglu(h_TD, f["w_gate_DF"], f["w_up_DF"], f["w_down_FD"]),)


@functools.partial(jax.jit, static_argnames=("impl",))
def routed_experts(h_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
                   valid_T: jax.Array, slot_table_E: jax.Array, w_gate_SDF: jax.Array,
                   w_up_SDF: jax.Array, w_down_SFD: jax.Array, *, impl: str | None = None):
  """The routed experts' weighted sum [T, D], read from expert buffers through a slot table.

  Args:
    h_TD: normed FFN input.
    ids_TK, weights_TK: the router's choices.
    valid_T: bool; padding tokens (False) are not dispatched, their rows are zero.
    slot_table_E: int32 expert id -> slot of the buffers.
    w_gate_SDF, w_up_SDF, w_down_SFD: the expert buffers (a layer's own [E, ...] params with
      the identity table, or the weights pool's slots).
    impl: expert dispatch implementation.
  """
  return expert_dispatch(h_TD, ids_TK, weights_TK, slot_table_E, w_gate_SDF, w_up_SDF,
                         w_down_SFD, valid_T=valid_T, impl=impl)


@functools.partial(jax.jit, static_argnames=("cfg",))
def combine(p_ffn: layers.Params, x_TD: jax.Array, h_TD: jax.Array, y_TD: jax.Array, *,
            cfg: ModelConfig):
  """Residual + routed experts `y_TD` + the shared expert of `h_TD` (if the family has one)."""
  return x_TD + layers.add_shared_expert(p_ffn, h_TD, y_TD, cfg)


def combine_pending(x_TD: jax.Array, pending, *, cfg: ModelConfig) -> jax.Array:
  """`combine` of a MoE layer whose experts ran elsewhere, `pending` = (p_ffn, h_TD, y_TD),
  inside the program that takes the layer's output next; `x_TD` as it is if None."""
  return x_TD if pending is None else combine(pending[0], x_TD, pending[1], pending[2], cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "impl"),
                   donate_argnames=("pool_PE",))
def attention_side(p: layers.Params, x_TD: jax.Array, pool_PE: jax.Array, batch: PagedBatch,
                   layer, pending=None, *, cfg: ModelConfig, moe: bool,
                   impl: str | None = None):
  """A layer up to its routed experts in ONE program, where one device's page pool holds every
  page of the batch: the previous MoE layer's `combine` if `pending` = (p_ffn, h_TD, y_TD),
  `attention_inputs`, `write_and_attend_paged` (pool donated), `post_attention`.

  Returns:
    (post_attention's outputs, updated pool).
  """
  x_TD = combine_pending(x_TD, pending, cfg=cfg)
  q_TNH, k_TKH, v_TKH = attention_inputs(p, x_TD, batch.positions_T, cfg=cfg, absorbed=cfg.mla)
  o_TNH, lse_TN, pool_PE = write_and_attend_paged(pool_PE, q_TNH, k_TKH, v_TKH, batch, layer,
                                                  cfg=cfg, impl=impl)
  return (post_attention(p, x_TD, [o_TNH], [lse_TN], cfg=cfg, moe=moe, absorbed=cfg.mla),
          pool_PE)


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "impl", "absorbed"))
def finish_layer(p: layers.Params, x_TD: jax.Array, outs_MTNH, lses_MTN, valid_T: jax.Array, *,
                 cfg: ModelConfig, moe: bool, impl: str | None = None, absorbed: bool = False):
  """`post_attention` (`absorbed` as there), then for a MoE layer `routed_experts` over the
  layer's own experts (identity slot table) and `combine`: the layer's tail where its experts
  are its params.

  Returns x_TD after the layer.
  """
  out = post_attention(p, x_TD, outs_MTNH, lses_MTN, cfg=cfg, moe=moe, absorbed=absorbed)
  if not moe:
    return out[0]
  x_TD, h_TD, ids_TK, weights_TK = out
  f = p["ffn"]
  identity_E = jnp.arange(cfg.num_experts, dtype=jnp.int32)
  y_TD = routed_experts(h_TD, ids_TK, weights_TK, valid_T, identity_E, f["w_gate_EDF"],
                        f["w_up_EDF"], f["w_down_EFD"], impl=impl)
  return combine(f, x_TD, h_TD, y_TD, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "moe"))
def train_layer(p: layers.Params, x_TD: jax.Array, positions_BT: jax.Array, *,
                cfg: ModelConfig, moe: bool):
  """A whole layer over whole sequences with no cache, differentiable (the training path).

  `attention_inputs`, causal attention of each sequence over its own keys, `post_attention`,
  then for a MoE layer every routed expert densely (`layers.dense_experts`) and `combine`.

  Args:
    p: the layer's params.
    x_TD: residual stream, T = B x T' flattened.
    positions_BT: int32 [B, T'], each row 0, 1, ..., T' - 1 (a sequence from its start).
    cfg: model config.
    moe: the layer is a MoE layer (else dense).

  Returns:
    (x_TD after the layer, the router's f32 logits [T, E] of a MoE layer or None).
  """
  bt = positions_BT.shape
  q_TNH, k_TKH, v_TKH = attention_inputs(p, x_TD, positions_BT.reshape(-1), cfg=cfg)
  # the sequence is its own cache: keys and values (or latent rows) as [B, K, C = T', H]
  kv_BKCH = [a.reshape(*bt, *a.shape[1:]).transpose(0, 2, 1, 3)
             for a in (k_TKH, v_TKH) if a is not None]
  q_BTNH = q_TNH.reshape(*bt, *q_TNH.shape[1:])
  if cfg.mla:
    o_BTNH = layers.attend_latent(q_BTNH, *kv_BKCH, p["attn"]["w_kv_b_ANH"], positions_BT, cfg,
                                  absorbed=False)
  else:
    o_BTNH = layers.attend_contiguous(q_BTNH, *kv_BKCH, positions_BT)
  out = post_attention(p, x_TD, [o_BTNH.reshape(*q_TNH.shape[:-1], -1)], None, cfg=cfg,
                       moe=moe)
  if not moe:
    return out[0], None
  x_TD, h_TD, ids_TK, weights_TK = out
  f = p["ffn"]
  y_TD = layers.dense_experts(h_TD, ids_TK, weights_TK, f["w_gate_EDF"], f["w_up_EDF"],
                              f["w_down_EFD"])
  return combine(f, x_TD, h_TD, y_TD, cfg=cfg), layers.router_logits(f["w_router_DE"], h_TD)


def last_token_rows(cu_q_lens_S1: jax.Array) -> jax.Array:
  """Row in T of each packed sequence's last token (0 for padding sequences)."""
  return jnp.maximum(cu_q_lens_S1[1:] - 1, 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head(params: layers.Params, x_TD: jax.Array, rows_S: jax.Array | None, *,
         cfg: ModelConfig) -> jax.Array:
  """Final norm and LM head: f32 logits [S, V] of the rows `rows_S` (every row if None)."""
  if rows_S is not None:
    x_TD = x_TD[rows_S]
  return layers.lm_head(params, x_TD, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head_and_sample(params: layers.Params, x_TD: jax.Array, cu_q_lens_S1: jax.Array,
                    sampling: dict, next_positions_S: jax.Array, pending=None, *,
                    cfg: ModelConfig):
  """`head` of each packed sequence's last token, then the token sampled there [S] int32.

  Args:
    params: the model's params (embedding / LM head, final norm).
    x_TD: residual stream after the last layer (before its `combine` if `pending`).
    cu_q_lens_S1: int32 [S + 1] start of each sequence's tokens in T.
    sampling: stacked sampling arrays [S] (`sampling.stack_params`).
    next_positions_S: int32 position of each sampled token (its random key).
    pending: the last MoE layer's (p_ffn, h_TD, y_TD), combined first in this program (as
      `attention_side` combines the previous layer's), or None.
    cfg: model config.
  """
  x_TD = combine_pending(x_TD, pending, cfg=cfg)
  logits_SV = head(params, x_TD, last_token_rows(cu_q_lens_S1), cfg=cfg)
  return sample(logits_SV, next_positions_S, **sampling)
