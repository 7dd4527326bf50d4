"""The model's forward pass on the paged KV pool, through the Pallas kernels.

One call runs a packed, ragged batch of one model — prefill chunks and single decode tokens of
several sequences together — against one device's pool buffer, which is donated and updated
in place: one jit composing the stages (`stages.py`) layer by layer, the KV store being
`stages.write_and_attend_paged` (latent attention: latent rows, the absorbed form for every
token, prefill chunks included). All host-side inputs are in one `PagedBatch` pytree,
precomputable by the pools, so a later executor can loop this step on device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from crosspool_jax.models import stages
from crosspool_jax.models.config import ModelConfig


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
  x_TD, valid_T = stages.embed(params["embed_VD"], batch.tokens_T, batch.positions_T)
  for i in range(cfg.num_layers):
    p = params["layers"][i]
    q_TNH, k_TKH, v_TKH = stages.attention_inputs(p, x_TD, batch.positions_T, cfg=cfg,
                                                  absorbed=cfg.mla)
    o_TNH, lse_TN, pool_PE = stages.write_and_attend_paged(pool_PE, q_TNH, k_TKH, v_TKH, batch,
                                                           i, cfg=cfg, impl=attn_impl)
    x_TD = stages.finish_layer(p, x_TD, [o_TNH], [lse_TN], valid_T, cfg=cfg,
                               moe=cfg.moe_layers[i], impl=moe_impl, absorbed=cfg.mla)
  rows_S = stages.last_token_rows(batch.cu_q_lens_S1)
  return stages.head(params, x_TD, rows_S, cfg=cfg), pool_PE
