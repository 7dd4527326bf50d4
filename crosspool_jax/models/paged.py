"""The model's forward pass on the paged KV pool, through the Pallas kernels.

One call runs a packed, ragged batch of one model — prefill chunks and single decode tokens of
several sequences together — against one device's pool buffer, which is donated and updated
in place (new K/V written by `write_kv`, attention read through the page tables by
`ragged_paged_attention`, experts run by `expert_dispatch`). All host-side inputs are in one
`PagedBatch` pytree, precomputable by the pools, so a later executor can loop this step on
device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from crosspool_jax.models import layers
from crosspool_jax.models.config import ModelConfig
from pallas_kernels.kv_write import write_kv
from pallas_kernels.ragged_paged_attention import merge_attention, ragged_paged_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedBatch:
  """One step's packed batch of one model on one KV device (all arrays int32)."""

  tokens_T: jax.Array  # [T] new tokens of all sequences, packed; rows past the last are padding
  positions_T: jax.Array  # [T] position of each token in its sequence; -1 for padding
  cu_q_lens_S1: jax.Array  # [S + 1] start of each sequence's tokens in T
  kv_lens_S: jax.Array  # [S] context length of each sequence, its new tokens included
  num_seqs_1: jax.Array  # [1] real sequences; later rows are padding
  page_tables_LSP: jax.Array  # [L, S, P] device-local page ids per layer; 0 = none / elsewhere
  slot_mapping_LT: jax.Array  # [L, T] local slot (page * page_tokens + offset) of each new K/V


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("pool_PE",))
def write_and_attend(pool_PE: jax.Array, q_TNH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array,
                     batch: PagedBatch, layer, *, cfg: ModelConfig, impl: str | None = None):
  """One layer's KV write and attention on ONE device's pool (donated, updated in place).

  `batch` is that device's copy of the step's inputs; `layer` (an int, traced: one executable
  serves every layer) picks its slot mapping and page table inside the jit, so a layer-by-layer
  caller dispatches no slicing of its own. With a device-local table (pages elsewhere = 0) the
  result is the partial attention over this device's pages; partials of several devices merge
  with `merge_attention`.

  Returns:
    (out_TNH in the pool dtype, lse_TN f32, updated pool).
  """
  slots_T = jax.lax.dynamic_index_in_dim(batch.slot_mapping_LT, layer, keepdims=False)
  table_SP = jax.lax.dynamic_index_in_dim(batch.page_tables_LSP, layer, keepdims=False)
  cu_q_lens_S1, kv_lens_S, num_seqs_1 = batch.cu_q_lens_S1, batch.kv_lens_S, batch.num_seqs_1
  dtype = pool_PE.dtype
  pool_PE = write_kv(pool_PE, k_TKH.astype(dtype), v_TKH.astype(dtype), slots_T, impl=impl)
  o_TNH, lse_TN = ragged_paged_attention(
      q_TNH.astype(dtype), pool_PE, table_SP, cu_q_lens_S1, kv_lens_S, num_seqs_1,
      kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, impl=impl)
  return o_TNH, lse_TN, pool_PE


def attention_layer(p: layers.Params, x_TD: jax.Array, pool_PE: jax.Array, batch: PagedBatch,
                    layer: int, cfg: ModelConfig, *, impl: str | None = None):
  """Attention of one layer over the pool: writes the new K/V, attends, projects.

  Returns (attention output [T, D] (residual not added), updated pool).
  """
  q_TNH, k_TKH, v_TKH = layers.attention_qkv(p, x_TD, batch.positions_T, cfg)
  o_TNH, _, pool_PE = write_and_attend(pool_PE, q_TNH, k_TKH, v_TKH, batch, layer, cfg=cfg,
                                       impl=impl)
  return layers.attention_out(p, o_TNH.astype(x_TD.dtype)), pool_PE


def _ffn_residual(p: layers.Params, x_TD: jax.Array, valid_T: jax.Array, layer: int,
                  cfg: ModelConfig, moe_impl: str | None) -> jax.Array:
  h_TD = layers.rms_norm(x_TD, p["ffn_norm_D"], cfg.rms_eps)
  moe_kwargs = {"valid_T": valid_T} if cfg.moe_layers[layer] else {}
  return x_TD + layers.ffn_block(p["ffn"], h_TD, cfg, layer, impl=moe_impl, **moe_kwargs)


def _last_token_logits(params: dict, x_TD: jax.Array, cu_q_lens_S1: jax.Array,
                       cfg: ModelConfig) -> jax.Array:
  last_S = jnp.maximum(cu_q_lens_S1[1:] - 1, 0)
  return layers.lm_head(params, x_TD[last_S], cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "moe_impl"),
                   donate_argnames=("pool_PE",))
def forward_paged(params: dict, pool_PE: jax.Array, batch: PagedBatch, *, cfg: ModelConfig,
                  attn_impl: str | None = None, moe_impl: str | None = None):
  """Runs one packed batch; returns (logits of each sequence's last token [S, V] f32, pool).

  Args:
    params: the model's param dict.
    pool_PE: [num_pages, page_elems] this device's KV pool; donated, returned updated.
    batch: the step's `PagedBatch`.
    cfg: model config (static).
    attn_impl: implementation of the attention and KV-write kernels.
    moe_impl: implementation of the expert dispatch kernel.
  """
  x_TD = params["embed_VD"][batch.tokens_T]
  valid_T = batch.positions_T >= 0
  for i in range(cfg.num_layers):
    p = params["layers"][i]
    h_TD = layers.rms_norm(x_TD, p["attn_norm_D"], cfg.rms_eps)
    attn_TD, pool_PE = attention_layer(p["attn"], h_TD, pool_PE, batch, i, cfg, impl=attn_impl)
    x_TD = _ffn_residual(p, x_TD + attn_TD, valid_T, i, cfg, moe_impl)
  return _last_token_logits(params, x_TD, batch.cu_q_lens_S1, cfg), pool_PE


@functools.partial(jax.jit, static_argnames=("cfg",))
def attention_inputs(p, x_TD, positions_T, *, cfg):
  """Attention norm and rotated q, k, v of one layer (p: the layer's params)."""
  h_TD = layers.rms_norm(x_TD, p["attn_norm_D"], cfg.rms_eps)
  return layers.attention_qkv(p["attn"], h_TD, positions_T, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "moe_impl"))
def _merge_and_ffn(p, x_TD, outs_MTNH, lses_MTN, valid_T, *, cfg, layer, moe_impl):
  o_TNH, _ = merge_attention(outs_MTNH, lses_MTN)
  x_TD = x_TD + layers.attention_out(p["attn"], o_TNH.astype(x_TD.dtype))
  return _ffn_residual(p, x_TD, valid_T, layer, cfg, moe_impl)


def forward_paged_spread(params: dict, pools: list[jax.Array], batches: list[PagedBatch], *,
                         cfg: ModelConfig, attn_impl: str | None = None,
                         moe_impl: str | None = None):
  """`forward_paged` for sequences whose pages are spread over several KV devices.

  Each layer's queries and new K/V go to every KV device; each device writes the K/V of the
  tokens whose pages it holds and attends over its local pages (`write_and_attend` with its
  local table); the partials come back to the device of `params` and merge exactly by their
  LSE; the FFN runs there. Host-dispatched per layer and device (a correctness path; a
  one-program SPMD version is the planned control lowering).

  Args:
    params: the model's params, on the device of pools[0] ("home": embeddings, merge, FFN).
    pools: [num_pages, page_elems] pool buffer of each KV device (each donated).
    batches: one `PagedBatch` per KV device, on that device: the same tokens, positions,
      query offsets and lengths; device-local page tables and slot mappings
      (`KVPool.local_tables`, `KVPool.slot_mapping`).

  Returns:
    (logits of each sequence's last token [S, V] f32 on the home device, updated pools).
  """
  if len(pools) != len(batches) or not pools:
    raise ValueError(f"need one batch per pool, got {len(pools)} pools, {len(batches)} batches")
  home = batches[0]
  x_TD = params["embed_VD"][home.tokens_T]
  valid_T = home.positions_T >= 0
  pools = list(pools)
  for i in range(cfg.num_layers):
    p = params["layers"][i]
    q_TNH, k_TKH, v_TKH = attention_inputs(p, x_TD, home.positions_T, cfg=cfg)
    outs, lses = [], []
    for d, b in enumerate(batches):
      dev = pools[d].devices().pop()
      o_TNH, lse_TN, pools[d] = write_and_attend(
          pools[d], *jax.device_put((q_TNH, k_TKH, v_TKH), dev), b, i, cfg=cfg, impl=attn_impl)
      home_dev = x_TD.devices().pop()
      outs.append(jax.device_put(o_TNH, home_dev))
      lses.append(jax.device_put(lse_TN, home_dev))
    x_TD = _merge_and_ffn(p, x_TD, outs, lses, valid_T, cfg=cfg, layer=i, moe_impl=moe_impl)
  return _last_token_logits(params, x_TD, home.cu_q_lens_S1, cfg), pools
