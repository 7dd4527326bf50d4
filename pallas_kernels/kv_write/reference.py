"""Writing new tokens' K/V into pool pages, plain jnp: the oracle and the CPU path.

A scatter with index arrays on the viewed pool, so a donated pool is updated in place (a scalar
index or dynamic_update_slice in a donated jit makes XLA copy the whole pool).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.layout import unview_pages, view_pages


def write_kv_reference(pool_PE: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array,
                       slot_mapping_T: jax.Array) -> jax.Array:
  """Scatters token t's K/V into slot slot_mapping_T[t] (= page * page_tokens + offset).

  Args:
    pool_PE: [num_pages, page_elems] the pool.
    k_TKH: [T, K, H] keys of the new tokens (pool dtype).
    v_TKH: [T, K, H] values.
    slot_mapping_T: int32 [T]; a negative slot drops the token (padding).

  Returns:
    The updated pool [num_pages, page_elems].
  """
  _, K, H = k_TKH.shape
  pages_P2TKH = view_pages(pool_PE, kv_heads=K, head_dim=H)
  num_pages, _, page_tokens = pages_P2TKH.shape[:3]
  slot_T = slot_mapping_T.astype(jnp.int32)
  # Negative slots go out of bounds (page num_pages) and are dropped by the scatter.
  page_T = jnp.where(slot_T < 0, num_pages, slot_T // page_tokens)
  off_T = jnp.where(slot_T < 0, 0, slot_T % page_tokens)
  kv_T2KH = jnp.stack([k_TKH, v_TKH], axis=1).astype(pool_PE.dtype)
  pages_P2TKH = pages_P2TKH.at[page_T, :, off_T].set(kv_T2KH, mode="drop",
                                                      unique_indices=False)
  return unview_pages(pages_P2TKH)
