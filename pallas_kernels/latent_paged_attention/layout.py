"""The latent page layout: one physical buffer `pool_PE`, viewed as pages of latent rows.

Glossary: P pages, E elements of a page, D the row width (kv_lora_rank + qk_rope: a token's
normalised latent c_kv, then its rotated rope key shared by all heads), A = kv_lora_rank the
latent part (the values), O = D - A the rope part. A page view `pages_PTD` has axes (page,
token slot inside the page (page_tokens of them), row). No separate V: the values are the
first A columns of the rows. Page 0 is the null page, as in the K/V layout: page-table entries
equal to 0 are skipped.
"""

from __future__ import annotations

import jax


def latent_page_tokens_of(page_elems: int, row_dim: int) -> int:
  """Tokens per page when a page of `page_elems` elements holds latent rows of `row_dim`.

  Raises ValueError unless page_elems == page_tokens * row_dim exactly (the view must be a free
  reshape, never a slice of the pool).
  """
  if row_dim <= 0:
    raise ValueError(f"row_dim must be positive, got {row_dim}")
  if page_elems % row_dim or page_elems == 0:
    raise ValueError(f"page_elems={page_elems} is not a positive multiple of the latent row "
                     f"width {row_dim}: this model cannot view the pool's pages")
  return page_elems // row_dim


def view_latent_pages(pool_PE: jax.Array, *, row_dim: int) -> jax.Array:
  """Views the pool as pages of latent rows, [num_pages, page_tokens, row_dim] (a reshape)."""
  if pool_PE.ndim != 2:
    raise ValueError(f"pool_PE must be [num_pages, page_elems], got shape {pool_PE.shape}")
  num_pages, page_elems = pool_PE.shape
  return pool_PE.reshape(num_pages, latent_page_tokens_of(page_elems, row_dim), row_dim)


def unview_latent_pages(pages_PTD: jax.Array) -> jax.Array:
  """Inverse of `view_latent_pages`: [P, page_tokens, D] -> pool_PE [P, page_elems]."""
  if pages_PTD.ndim != 3:
    raise ValueError(f"pages_PTD must be [P, page_tokens, D], got {pages_PTD.shape}")
  return pages_PTD.reshape(pages_PTD.shape[0], -1)
