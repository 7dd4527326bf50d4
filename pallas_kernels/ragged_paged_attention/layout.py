"""The KV pool layout: one physical buffer `pool_PE`, viewed per model as K/V pages.

Glossary: P pages, E elements of a page; in a page view `pages_P2TKH` the axes are
(page, 0 = K / 1 = V, token slot inside the page (page_tokens of them), kv head, head dim).
Page 0 is the null page: it never holds data, and page-table entries equal to 0 are skipped.
"""

from __future__ import annotations

import jax


def page_tokens_of(page_elems: int, kv_heads: int, head_dim: int) -> int:
  """Tokens per page when a page of `page_elems` elements holds K and V of `kv_heads` heads.

  Raises ValueError unless page_elems == 2 * page_tokens * kv_heads * head_dim exactly (the view
  must be a free reshape, never a slice of the pool).
  """
  if kv_heads <= 0 or head_dim <= 0:
    raise ValueError(f"kv_heads and head_dim must be positive, got {kv_heads}, {head_dim}")
  per_token = 2 * kv_heads * head_dim
  if page_elems % per_token or page_elems == 0:
    raise ValueError(
        f"page_elems={page_elems} is not a positive multiple of 2 * kv_heads * head_dim = "
        f"2 * {kv_heads} * {head_dim} = {per_token}: this model cannot view the pool's pages")
  return page_elems // per_token


def view_pages(pool_PE: jax.Array, *, kv_heads: int, head_dim: int) -> jax.Array:
  """Views the pool as K/V pages (a reshape, free inside jit).

  Args:
    pool_PE: [num_pages, page_elems] the physical pool of one device.
    kv_heads: K, kv heads of the model.
    head_dim: H, head dim of the model.

  Returns:
    pages_P2TKH: [num_pages, 2, page_tokens, K, H]; [:, 0] is K, [:, 1] is V.
  """
  if pool_PE.ndim != 2:
    raise ValueError(f"pool_PE must be [num_pages, page_elems], got shape {pool_PE.shape}")
  num_pages, page_elems = pool_PE.shape
  page_tokens = page_tokens_of(page_elems, kv_heads, head_dim)
  return pool_PE.reshape(num_pages, 2, page_tokens, kv_heads, head_dim)


def unview_pages(pages_P2TKH: jax.Array) -> jax.Array:
  """Inverse of `view_pages`: [P, 2, page_tokens, K, H] -> pool_PE [P, page_elems]."""
  if pages_P2TKH.ndim != 5 or pages_P2TKH.shape[1] != 2:
    raise ValueError(f"pages_P2TKH must be [P, 2, page_tokens, K, H], got {pages_P2TKH.shape}")
  return pages_P2TKH.reshape(pages_P2TKH.shape[0], -1)
