"""Ragged paged attention over the shared KV pool (prefill chunks + decode, GQA, LSE out)."""

from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention, validate_inputs
from pallas_kernels.ragged_paged_attention.kernel import BlockSizes, default_block_sizes
from pallas_kernels.ragged_paged_attention.layout import page_tokens_of, unview_pages, view_pages
from pallas_kernels.ragged_paged_attention.reference import (
  merge_attention,
  ragged_paged_attention_reference,
)

__all__ = [
  "BlockSizes",
  "default_block_sizes",
  "merge_attention",
  "page_tokens_of",
  "ragged_paged_attention",
  "ragged_paged_attention_reference",
  "unview_pages",
  "validate_inputs",
  "view_pages",
]
