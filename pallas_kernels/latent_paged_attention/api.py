"""The public latent paged attention function and its host-side input validator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._impl import resolve_impl
from pallas_kernels.latent_paged_attention import kernel as _kernel
from pallas_kernels.latent_paged_attention import reference as _reference
from pallas_kernels.latent_paged_attention.layout import (
  latent_page_tokens_of,
  unview_latent_pages,
  view_latent_pages,
)
from pallas_kernels.ragged_paged_attention.api import (
  check_batch_shapes,
  validate_batch_values,
)
from pallas_kernels.ragged_paged_attention.kernel import (
  BlockSizes,
  pack_queries,
  unpack_outputs,
)
from pallas_kernels.ragged_paged_attention.reference import work_items


def _check_shapes(q_TND, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs,
                  kv_lora_rank):
  """Trace-time shape / dtype checks; raises ValueError naming the argument. Returns Tp."""
  check_batch_shapes(q_TND, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs)
  D = q_TND.shape[-1]
  if not (isinstance(kv_lora_rank, int) and 0 < kv_lora_rank <= D):
    raise ValueError(f"kv_lora_rank must be an int in [1, row width {D}], got {kv_lora_rank!r}")
  return latent_page_tokens_of(pool_PE.shape[1], D)


def latent_paged_attention(q_TND: jax.Array, pool_PE: jax.Array, page_table_SP: jax.Array,
                           cu_q_lens_S1: jax.Array, kv_lens_S: jax.Array, num_seqs: jax.Array,
                           *, kv_lora_rank: int, sm_scale: float, impl: str | None = None,
                           block_sizes: BlockSizes | tuple[int, int] | None = None):
  """Causal latent (MLA, absorbed form) attention of a mixed prefill / decode batch over pages
  of latent rows.

  A cached row is [kv_lora_rank + qk_rope]: a token's normalised latent c_kv, then its rotated
  rope key. The queries come absorbed (q_nope . W_UK, then q_rope: the same width); the score
  of a query and a row is their dot product over the whole row, times `sm_scale`; the value
  is the row's latent part, so out is [T, N, kv_lora_rank] (W_UV is applied outside). The
  contract is `ragged_paged_attention`'s with one kv head: positions, causality within a
  chunk, page-table entries 0 skipped (partials merge exactly with `merge_attention`), unseen
  slots and pages never reach the result (they may hold NaN), NaN or inf in a seen row
  surfaces.

  Args:
    q_TND: [T, N, D] absorbed queries of all sequences packed along T (float, D =
      kv_lora_rank + qk_rope). Rows at or past cu_q_lens_S1[num_seqs] are padding.
    pool_PE: [num_pages, page_elems] the device's latent pool, same dtype as q; viewed as
      [num_pages, page_tokens, D] (page_elems must equal page_tokens * D).
    page_table_SP: int32 [S, P] page ids of each sequence in order; 0 = skip.
    cu_q_lens_S1: int32 [S + 1] query start offsets (monotone up to num_seqs).
    kv_lens_S: int32 [S] total context length of each sequence, its new tokens included.
    num_seqs: int32 [1] number of real sequences; later rows of the tables are ignored.
    kv_lora_rank: A, the width of the latent part (the values).
    sm_scale: the model's softmax scale (1 / sqrt(qk_nope + qk_rope), times YaRN's mscale²).
    impl: "pallas" (Mosaic on TPU, Triton on GPU, chosen by the lowering platform),
      "interpret" (the TPU kernel in the Pallas interpreter), "reference" (plain jnp) or None
      (pallas on GPU/TPU, reference elsewhere).
    block_sizes: None (`kernel.default_block_sizes`) or (q_block, pages_per_block).

  Returns:
    (out_TNA [T, N, kv_lora_rank] in q's dtype, lse_TN float32 natural-log sum-exp of the
    scaled scores). Padding tokens and tokens that see no key get out 0 and lse -inf.
  """
  page_tokens = _check_shapes(q_TND, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs,
                              kv_lora_rank)
  T, N, D = q_TND.shape
  sm_scale = float(sm_scale)
  impl = resolve_impl(impl, pallas_backends=("gpu", "tpu"))
  if impl == "reference":
    return _reference.latent_paged_attention_reference(
        q_TND, view_latent_pages(pool_PE, row_dim=D), page_table_SP, cu_q_lens_S1, kv_lens_S,
        num_seqs, kv_lora_rank=kv_lora_rank, sm_scale=sm_scale)

  def run(backend, q_TND, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs):
    if block_sizes is None:
      bs = _kernel.default_block_sizes(backend, N, page_tokens)
    else:
      bs = BlockSizes(*block_sizes)
      if bs.q_block < 1 or bs.pages_per_block < 1:
        raise ValueError(f"block_sizes must be positive, got {tuple(bs)}")
    items = work_items(cu_q_lens_S1, kv_lens_S, num_seqs, num_tokens=T, q_block=bs.q_block,
                       page_tokens=page_tokens, pages_per_seq=page_table_SP.shape[1])
    q_W1RD = pack_queries(q_TND, items, 1, bs.q_block)
    common = dict(kv_lora_rank=kv_lora_rank, page_tokens=page_tokens, group=N,
                  sm_scale=sm_scale)
    if backend == "gpu":
      out, lse = _kernel.attention_gpu(q_W1RD, pool_PE, page_table_SP, items, kv_lens_S,
                                       **common)
    else:
      out, lse = _kernel.attention_tpu(q_W1RD, pool_PE, page_table_SP, items, kv_lens_S,
                                       pages_per_block=bs.pages_per_block,
                                       interpret=backend == "interpret", **common)
    return unpack_outputs(out, lse, items, bs.q_block)

  args = (q_TND, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs)
  if impl == "interpret":
    return run("interpret", *args)
  # Picked by the lowering platform, not a device query: traces and cross-lowers anywhere.
  return jax.lax.platform_dependent(
      *args, tpu=lambda *a: run("tpu", *a), cuda=lambda *a: run("gpu", *a))


def validate_inputs(q_TND, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs, *,
                    kv_lora_rank: int) -> None:
  """Host-side value checks (numpy), those of `ragged_paged_attention.validate_inputs` with
  latent pages; raises ValueError naming the argument and the index."""
  structs = [jax.ShapeDtypeStruct(a.shape, a.dtype)
             for a in (q_TND, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs)]
  page_tokens = _check_shapes(*structs, kv_lora_rank)
  validate_batch_values(page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs,
                        num_tokens=q_TND.shape[0], num_pages=pool_PE.shape[0],
                        page_tokens=page_tokens)


@functools.partial(jax.jit, donate_argnames=("pool_PE",))
def write_latent_rows(pool_PE: jax.Array, rows_TD: jax.Array,
                      slot_mapping_T: jax.Array) -> jax.Array:
  """Writes the new tokens' latent rows into their page slots; the pool is donated (in place).

  One scatter on every backend (XLA updates the donated buffer in place; a row is one
  contiguous [D] run of its page, so there is no Pallas kernel).

  Args:
    pool_PE: [num_pages, page_elems] the device's pool (DONATED), viewed as
      [num_pages, page_tokens, D] (`view_latent_pages`).
    rows_TD: [T, D] the rows of the T new tokens, pool dtype.
    slot_mapping_T: int32 [T] slot = page_id * page_tokens + offset of each token; negative =
      drop (padding), any slot of the null page 0 is harmless; live slots distinct.

  Returns:
    The updated pool [num_pages, page_elems] (reusing the donated buffer).
  """
  if rows_TD.ndim != 2:
    raise ValueError(f"rows_TD must be [T, D], got shape {rows_TD.shape}")
  if rows_TD.dtype != pool_PE.dtype:
    raise ValueError(f"rows_TD dtype {rows_TD.dtype} must equal pool_PE dtype {pool_PE.dtype}")
  if slot_mapping_T.shape != rows_TD.shape[:1] or slot_mapping_T.dtype != jnp.int32:
    raise ValueError(f"slot_mapping_T must be int32 [T={rows_TD.shape[0]}], got "
                     f"{slot_mapping_T.dtype} {slot_mapping_T.shape}")
  pages_PTD = view_latent_pages(pool_PE, row_dim=rows_TD.shape[1])
  return unview_latent_pages(
      _reference.write_latent_rows_reference(pages_PTD, rows_TD, slot_mapping_T))
