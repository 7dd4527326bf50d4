"""Latent paged attention in plain jnp: the oracle of the kernels and the CPU path.

The ragged paged attention reference (`ragged_paged_attention.reference.attend_pages`: work
items, prefix chunks with an online softmax, the causal diagonal, NaN safety both ways) over
latent pages: one kv head whose key is the whole row and whose value is the row's first
kv_lora_rank columns. Glossary as `layout` (D row, A = kv_lora_rank) and the ragged kernel's
(T tokens, N heads, S sequences, P pages per sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.reference import attend_pages


def latent_paged_attention_reference(q_TND: jax.Array, pages_PTD: jax.Array,
                                     page_table_SP: jax.Array, cu_q_lens_S1: jax.Array,
                                     kv_lens_S: jax.Array, num_seqs: jax.Array, *,
                                     kv_lora_rank: int, sm_scale: float, chunk_pages: int = 8,
                                     q_block: int | None = None):
  """Latent paged attention, plain jnp (see `api.latent_paged_attention` for the contract).

  Args:
    q_TND: [T, N, D] absorbed queries.
    pages_PTD: [num_pages, page_tokens, D] the viewed pool (`view_latent_pages`).
    page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs: as `latent_paged_attention`.
    kv_lora_rank: A, the values' width (the rows' first A columns).
    sm_scale: softmax scale.
    chunk_pages, q_block: as `ragged_paged_attention_reference`.

  Returns:
    (out_TNA in q's dtype, lse_TN float32); padding tokens and tokens that see no key give
    out 0 and lse -inf.
  """
  A = kv_lora_rank

  def page_kv(pids_WC):
    rows_WCT1D = pages_PTD[pids_WC][..., None, :]
    return rows_WCT1D, rows_WCT1D[..., :A]

  def slot_kv(pids_WJ, slots_WJ):
    rows_WJ1D = pages_PTD[pids_WJ, slots_WJ][..., None, :]
    return rows_WJ1D, rows_WJ1D[..., :A]

  return attend_pages(q_TND, page_kv, slot_kv, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs,
                      page_tokens=pages_PTD.shape[1], kv_heads=1, value_dim=A,
                      sm_scale=sm_scale, chunk_pages=chunk_pages, q_block=q_block)


def write_latent_rows_reference(pages_PTD: jax.Array, rows_TD: jax.Array,
                                slot_mapping_T: jax.Array) -> jax.Array:
  """Scatters token t's latent row into slot slot_mapping_T[t] (= page * page_tokens +
  offset) of the viewed pool [num_pages, page_tokens, D]; a negative slot drops the token.
  Index arrays, so a donated pool is updated in place (as `kv_write`'s reference)."""
  num_pages, page_tokens = pages_PTD.shape[:2]
  slot_T = slot_mapping_T.astype(jnp.int32)
  # Negative slots go out of bounds (page num_pages) and are dropped by the scatter.
  page_T = jnp.where(slot_T < 0, num_pages, slot_T // page_tokens)
  off_T = jnp.where(slot_T < 0, 0, slot_T % page_tokens)
  return pages_PTD.at[page_T, off_T].set(rows_TD.astype(pages_PTD.dtype), mode="drop",
                                         unique_indices=False)
