"""The public KV write (pool donated, updated in place) and its host-side validator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._impl import resolve_impl
from pallas_kernels.kv_write import kernel as _kernel
from pallas_kernels.kv_write import reference as _reference
from pallas_kernels.ragged_paged_attention.layout import page_tokens_of


def _check_shapes(pool_PE, k_TKH, v_TKH, slot_mapping_T) -> int:
  """Trace-time shape / dtype checks; raises ValueError naming the argument. Returns Tp."""

  def need(cond, msg):
    if not cond:
      raise ValueError(msg)

  need(pool_PE.ndim == 2, f"pool_PE must be [num_pages, page_elems], got shape {pool_PE.shape}")
  need(k_TKH.ndim == 3, f"k_TKH must be [T, K, H], got shape {k_TKH.shape}")
  need(v_TKH.shape == k_TKH.shape, f"v_TKH must have k_TKH's shape {k_TKH.shape}, got "
       f"{v_TKH.shape}")
  T, K, H = k_TKH.shape
  need(slot_mapping_T.shape == (T,), f"slot_mapping_T must be [T={T}], got "
       f"{slot_mapping_T.shape}")
  need(slot_mapping_T.dtype == jnp.int32, f"slot_mapping_T must be int32, got "
       f"{slot_mapping_T.dtype}")
  for name, a in (("k_TKH", k_TKH), ("v_TKH", v_TKH)):
    need(a.dtype == pool_PE.dtype, f"{name} dtype {a.dtype} must equal pool_PE dtype "
         f"{pool_PE.dtype}")
  return page_tokens_of(pool_PE.shape[1], K, H)


@functools.partial(jax.jit, static_argnames=("impl",), donate_argnames=("pool_PE",))
def write_kv(pool_PE: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array, slot_mapping_T: jax.Array,
             *, impl: str | None = None) -> jax.Array:
  """Writes the new tokens' K and V into their page slots; the pool is donated (in place).

  Args:
    pool_PE: [num_pages, page_elems] the device's KV pool (DONATED: do not use it afterwards),
      viewed as [num_pages, 2, page_tokens, K, H] with page_tokens = page_elems / (2 K H).
    k_TKH: [T, K, H] keys of the T new tokens, pool dtype.
    v_TKH: [T, K, H] values.
    slot_mapping_T: int32 [T] slot = page_id * page_tokens + offset of each token. Padding
      tokens: a negative slot (dropped, nothing written) or any slot of the null page 0
      (harmless: page 0 never holds data). Live slots must be distinct (else which write wins is
      unspecified).
    impl: "pallas" (Mosaic on TPU, Triton on GPU), "interpret" (the TPU kernel in the Pallas
      interpreter), "reference" (a scatter) or None (pallas on GPU/TPU, reference elsewhere).

  Returns:
    The updated pool [num_pages, page_elems] (reusing the donated buffer).
  """
  _check_shapes(pool_PE, k_TKH, v_TKH, slot_mapping_T)
  impl = resolve_impl(impl, pallas_backends=("gpu", "tpu"))
  args = (pool_PE, k_TKH, v_TKH, slot_mapping_T)
  if impl == "reference":
    return _reference.write_kv_reference(*args)
  if impl == "interpret":
    return _kernel.write_kv_tpu(*args, interpret=True)
  return jax.lax.platform_dependent(*args, tpu=_kernel.write_kv_tpu, cuda=_kernel.write_kv_gpu)


def validate_inputs(pool_PE, k_TKH, v_TKH, slot_mapping_T) -> None:
  """Host-side value checks (numpy); raises ValueError naming the argument and the index.

  Checks the shapes, that every slot is negative (drop) or in [0, num_pages * page_tokens), and
  that slots outside the null page 0 are distinct.
  """
  page_tokens = _check_shapes(*(jax.ShapeDtypeStruct(a.shape, a.dtype)
                                for a in (pool_PE, k_TKH, v_TKH, slot_mapping_T)))
  slots = np.asarray(slot_mapping_T)
  cap = pool_PE.shape[0] * page_tokens
  bad = np.flatnonzero(slots >= cap)
  if bad.size:
    t = bad[0]
    raise ValueError(f"slot_mapping_T[{t}]={slots[t]} is past the pool's num_pages * "
                     f"page_tokens = {cap} slots")
  live = slots[slots >= page_tokens]
  uniq, counts = np.unique(live, return_counts=True)
  if (counts > 1).any():
    dup = uniq[counts > 1][0]
    raise ValueError(f"slot_mapping_T writes slot {dup} more than once (tokens "
                     f"{np.flatnonzero(slots == dup).tolist()})")
