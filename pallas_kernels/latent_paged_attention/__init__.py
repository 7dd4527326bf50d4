"""Latent (MLA) paged attention: ragged prefill chunks + decode over pages of latent rows,
absorbed queries, LSE out; the rows' write."""

from pallas_kernels.latent_paged_attention.api import (
  latent_paged_attention,
  validate_inputs,
  write_latent_rows,
)
from pallas_kernels.latent_paged_attention.kernel import default_block_sizes
from pallas_kernels.latent_paged_attention.layout import (
  latent_page_tokens_of,
  unview_latent_pages,
  view_latent_pages,
)
from pallas_kernels.latent_paged_attention.reference import latent_paged_attention_reference
from pallas_kernels.ragged_paged_attention.reference import merge_attention

__all__ = [
  "default_block_sizes",
  "latent_page_tokens_of",
  "latent_paged_attention",
  "latent_paged_attention_reference",
  "merge_attention",
  "unview_latent_pages",
  "validate_inputs",
  "view_latent_pages",
  "write_latent_rows",
]
