"""Writing new tokens' K/V into pool pages, Pallas: a TPU (Mosaic) and a GPU (Triton) kernel.

Both alias the pool input to the output (`input_output_aliases`), so with the pool donated the
write is in place and only the written slots move.

TPU: grid over tokens; the output BlockSpec is one slot of one page, [2, K, H] of the view
[num_pages, 2, page_tokens, K, H], placed by the slot mapping through scalar prefetch. Dropped
tokens (negative slot) are redirected to slot 0 of the null page 0 (harmless).
GPU: Triton, grid over tokens, a masked store (skipped for negative slots) into the whole pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


def _tpu_kernel(slot_ref, k_ref, v_ref, pool_ref, o_ref):
  del slot_ref, pool_ref  # placement is done by the index maps; the pool is only aliased
  o_ref[0] = k_ref[...].astype(o_ref.dtype)
  o_ref[1] = v_ref[...].astype(o_ref.dtype)


def write_kv_tpu(pool_PE, k_TKH, v_TKH, slot_mapping_T, *, interpret: bool = False):
  """TPU kernel (also the interpret-mode path). Arguments as `reference.write_kv_reference`."""
  T, K, H = k_TKH.shape
  num_pages, page_elems = pool_PE.shape
  page_tokens = page_elems // (2 * K * H)
  pages_P2TKH = pool_PE.reshape(num_pages, 2, page_tokens, K, H)
  slot_T = jnp.maximum(slot_mapping_T.astype(jnp.int32), 0)  # drop -> null page, slot 0

  def tok_map(t, slots):
    return t, 0, 0

  def out_map(t, slots):
    # lax.div / lax.rem (slots are >= 0 here): `//` lowers through `sign`, which Mosaic cannot
    # lower off-chip.
    tp = jnp.int32(page_tokens)
    return jax.lax.div(slots[t], tp), 0, jax.lax.rem(slots[t], tp), 0, 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(T,),
      in_specs=[pl.BlockSpec((pl.Squeezed(), K, H), tok_map),
                pl.BlockSpec((pl.Squeezed(), K, H), tok_map),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((pl.Squeezed(), 2, pl.Squeezed(), K, H), out_map),
  )
  call = pl.pallas_call(
      _tpu_kernel,
      out_shape=jax.ShapeDtypeStruct(pages_P2TKH.shape, pool_PE.dtype),
      grid_spec=grid_spec,
      input_output_aliases={3: 0},  # operand 3 (after the prefetched slots) is the pool
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      name=f"kv_write_tpu_Tp{page_tokens}_K{K}_H{H}",
  )
  return call(slot_T, k_TKH, v_TKH, pages_P2TKH).reshape(num_pages, page_elems)


def _gpu_kernel(slot_ref, k_ref, v_ref, pool_ref, o_ref, *, page_tokens: int):
  del pool_ref  # aliased to o_ref
  t = pl.program_id(0)
  slot = slot_ref[t]

  @pl.when(slot >= 0)
  def _():
    page, off = slot // page_tokens, slot % page_tokens
    o_ref[page, 0, off] = k_ref[...].astype(o_ref.dtype)
    o_ref[page, 1, off] = v_ref[...].astype(o_ref.dtype)


def write_kv_gpu(pool_PE, k_TKH, v_TKH, slot_mapping_T, *, interpret: bool = False):
  """GPU (Triton) kernel. Arguments as `reference.write_kv_reference`; K and H powers of 2."""
  T, K, H = k_TKH.shape
  num_pages, page_elems = pool_PE.shape
  page_tokens = page_elems // (2 * K * H)
  pages_P2TKH = pool_PE.reshape(num_pages, 2, page_tokens, K, H)
  call = pl.pallas_call(
      lambda *refs: _gpu_kernel(*refs, page_tokens=page_tokens),
      out_shape=jax.ShapeDtypeStruct(pages_P2TKH.shape, pool_PE.dtype),
      grid=(T,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec((None, K, H), lambda t: (t, 0, 0)),
                pl.BlockSpec((None, K, H), lambda t: (t, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec(memory_space=pl.ANY),
      input_output_aliases={3: 0},
      compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name=f"kv_write_gpu_Tp{page_tokens}_K{K}_H{H}",
  )
  return call(slot_mapping_T.astype(jnp.int32), k_TKH, v_TKH,
              pages_P2TKH).reshape(num_pages, page_elems)
