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
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


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


def attention_layer(p: layers.Params, x_TD: jax.Array, pool_PE: jax.Array, batch: PagedBatch,
                    layer: int, cfg: ModelConfig, *, impl: str | None = None):
  """Attention of one layer over the pool: writes the new K/V, attends, projects.

  Returns (attention output [T, D] (residual not added), updated pool).
  """
  q_TNH, k_TKH, v_TKH = layers.attention_qkv(p, x_TD, batch.positions_T, cfg)
  pool_PE = write_kv(pool_PE, k_TKH.astype(pool_PE.dtype), v_TKH.astype(pool_PE.dtype),
                     batch.slot_mapping_LT[layer], impl=impl)
  o_TNH, _ = ragged_paged_attention(
      q_TNH.astype(pool_PE.dtype), pool_PE, batch.page_tables_LSP[layer], batch.cu_q_lens_S1,
      batch.kv_lens_S, batch.num_seqs_1, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      impl=impl)
  return layers.attention_out(p, o_TNH.astype(x_TD.dtype)), pool_PE


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
    x_TD = x_TD + attn_TD
    h_TD = layers.rms_norm(x_TD, p["ffn_norm_D"], cfg.rms_eps)
    moe_kwargs = {"valid_T": valid_T} if cfg.moe_layers[i] else {}
    x_TD = x_TD + layers.ffn_block(p["ffn"], h_TD, cfg, i, impl=moe_impl, **moe_kwargs)
  last_S = jnp.maximum(batch.cu_q_lens_S1[1:] - 1, 0)
  return layers.lm_head(params, x_TD[last_S], cfg), pool_PE
