"""Pallas grouped matmul over a slot-indexed weights pool (megablox-style tiling).

The rows (sorted (token, choice) pairs) are cut into m-tiles of `tm` rows. A group (one expert of
the layer, living in pool slot `group_slots_G[g]`) owns a contiguous row range, so it touches a
few consecutive m-tiles and an m-tile may be shared by consecutive groups. The grid walks the
list of (group, m-tile) *visits*, at most `M / tm + G - 1` of them (a static bound); visits past
the real count repeat the last real visit, which is idempotent. Each visit reads the pool tile
`w[slot, k-block, n-block]` through the slot ids (TPU: scalar prefetch in the index map; GPU:
a dynamic index into the pool ref), accumulates in f32 over the k-blocks and stores only the
rows of its group, so rows of other groups in the same m-tile are left as they are. Rows of no
group (padding) are never written: callers must ignore them.

Two kernels use this walk: gate/up with SwiGLU fused (two pools, two accumulators, the output is
silu(x @ w_gate) * (x @ w_up)), and down (one pool).

TPU: Mosaic, `pltpu.PrefetchScalarGridSpec`, grid (n-blocks, visits, k-blocks).
GPU: Triton (`pallas.triton.CompilerParams`), grid (visits, n-blocks), k loop in the kernel,
masked stores (visits of one m-tile write disjoint rows, so they may run in parallel).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Tiling = tuple[int, int, int]
TilingFn = Callable[[int, int, int], Tiling]

# (backend, D, F, dtype name) -> (tm, tk, tn), used for both calls (gate/up: k = D, n = F;
# down: k = F, n = D). tk / tn that do not divide their dimension fall back to the full dim.
# Starting points sized for VMEM / shared memory, not tuned on chips yet.
TILING_TABLE: dict[tuple[str, int, int, str], Tiling] = {
    ("tpu", 4096, 14336, "bfloat16"): (512, 1024, 1024),  # Mixtral-8x7B
    ("tpu", 2048, 1408, "bfloat16"): (256, 512, 128),  # Qwen2-MoE / DeepSeek-style small F
    ("tpu", 2048, 1024, "bfloat16"): (256, 512, 512),  # OLMoE
    ("gpu", 4096, 14336, "bfloat16"): (64, 64, 128),
    ("gpu", 2048, 1408, "bfloat16"): (64, 64, 128),
    ("gpu", 2048, 1024, "bfloat16"): (64, 64, 128),
}


def _fit(block: int, dim: int) -> int:
  """`block` if it divides `dim`, else the full dimension (always a legal block)."""
  return block if block <= dim and dim % block == 0 else dim


def default_tiling(backend: str, D: int, F: int, dtype) -> Tiling:
  """Table entry for (backend, D, F, dtype), else a heuristic.

  Args:
    backend: "tpu", "gpu" or "interpret".
    D: model dim. F: expert hidden dim. dtype: activation / weight dtype.
  """
  key = (backend, D, F, jnp.dtype(dtype).name)
  if key in TILING_TABLE:
    return TILING_TABLE[key]
  if backend == "gpu":
    return (64, 64, 128)  # Triton: powers of two, fits shared memory at bf16 and f32
  if backend == "tpu":
    return (256 if jnp.dtype(dtype).itemsize <= 2 else 128, 512, 512)
  return (16, 512, 512)  # interpret: few rows per tile keeps the step count low


def resolve_tiling(tiling: Tiling | TilingFn | None, backend: str, m: int, k: int, n: int,
                   D: int, F: int, dtype) -> Tiling:
  """The (tm, tk, tn) of one grouped-matmul call of shape [m, k] x [k, n].

  Args:
    tiling: None (table / heuristic), a (tm, tk, tn) tuple, or a callable (m, k, n) -> tuple
      (as megablox `gmm`).
    backend, D, F, dtype: the table key.
    m, k, n: this call's rows, contracting and output dims.
  """
  if tiling is None:
    tm, tk, tn = default_tiling(backend, D, F, dtype)
  elif callable(tiling):
    tm, tk, tn = tiling(m, k, n)
  else:
    tm, tk, tn = tiling
  if min(tm, tk, tn) <= 0:
    raise ValueError(f"tiling must be positive, got {(tm, tk, tn)}")
  return tm, _fit(tk, k), _fit(tn, n)


def visit_metadata(group_sizes_G: jax.Array, num_rows: int, tm: int):
  """Group offsets and the (group, m-tile) visits of the grid.

  Args:
    group_sizes_G: int32 [G], rows per group; sum <= num_rows.
    num_rows: M, a multiple of tm.
    tm: rows per m-tile.

  Returns:
    (group_offsets_G1 int32 [G + 1], visit_group_V int32 [V], visit_tile_V int32 [V]) with
    V = num_rows // tm + G - 1 (static): visit v computes group visit_group_V[v] on m-tile
    visit_tile_V[v]. Visits past the real ones repeat the last real one.
  """
  G = group_sizes_G.shape[0]
  num_tiles = num_rows // tm
  V = num_tiles + G - 1
  sizes_G = group_sizes_G.astype(jnp.int32)
  ends_G = jnp.cumsum(sizes_G)
  starts_G = ends_G - sizes_G
  first_tile_G = starts_G // tm
  tiles_G = jnp.where(sizes_G > 0, (ends_G + tm - 1) // tm - first_tile_G, 0)
  visit_end_G = jnp.cumsum(tiles_G)
  total = visit_end_G[-1]
  v_V = jnp.minimum(jnp.arange(V, dtype=jnp.int32), jnp.maximum(total - 1, 0))
  group_V = jnp.minimum(jnp.searchsorted(visit_end_G, v_V, side="right"), G - 1)
  group_V = group_V.astype(jnp.int32)
  tile_V = first_tile_G[group_V] + v_V - (visit_end_G[group_V] - tiles_G[group_V])
  tile_V = jnp.clip(tile_V, 0, num_tiles - 1).astype(jnp.int32)
  offsets_G1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G])
  return offsets_G1, group_V, tile_V


def _epilogue(accs, swiglu: bool):
  if swiglu:
    gate, up = accs
    return jax.nn.silu(gate) * up
  return accs[0]


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)


def _tpu_kernel(offsets_ref, group_ref, tile_ref, slots_ref, x_ref, *refs, swiglu: bool,
                tm: int):
  num_w = 2 if swiglu else 1
  w_refs, o_ref, acc_refs = refs[:num_w], refs[num_w], refs[num_w + 1:]
  del slots_ref  # only used by the index maps
  v, k = pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _():
    for acc_ref in acc_refs:
      acc_ref[...] = jnp.zeros_like(acc_ref)

  x = x_ref[...]
  for w_ref, acc_ref in zip(w_refs, acc_refs, strict=True):
    acc_ref[...] += jnp.dot(x, w_ref[...], preferred_element_type=jnp.float32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    g = group_ref[v]
    rows = tile_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, 0)
    mask = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
    val = _epilogue([acc_ref[...] for acc_ref in acc_refs], swiglu)
    old = o_ref[...].astype(jnp.float32)
    o_ref[...] = jnp.where(mask, val, old).astype(o_ref.dtype)


def gmm_tpu(lhs_MK, w_SKNs, group_slots_G, group_sizes_G, *, tiling: Tiling, out_dtype,
            swiglu: bool, interpret: bool = False):
  """Grouped matmul over the pool, TPU kernel (also the interpret-mode path).

  Args:
    lhs_MK: [M, K] rows sorted by group, M a multiple of tm.
    w_SKNs: tuple of pools [S, K, N]: (w_gate, w_up) if swiglu else (w_down,).
    group_slots_G: int32 [G], pool slot of each group.
    group_sizes_G: int32 [G], rows of each group.
    tiling: (tm, tk, tn), tk | K, tn | N, tm | M.
    out_dtype: result dtype.
    swiglu: fuse silu(lhs @ w0) * (lhs @ w1).
    interpret: run with the Pallas interpreter.

  Returns:
    [M, N] in out_dtype; rows of no group hold unspecified values.
  """
  M, K = lhs_MK.shape
  N = w_SKNs[0].shape[2]
  tm, tk, tn = tiling
  offsets_G1, group_V, tile_V = visit_metadata(group_sizes_G, M, tm)
  V = group_V.shape[0]

  def lhs_map(n, v, k, offsets, groups, tiles, slots):
    return tiles[v], k

  def w_map(n, v, k, offsets, groups, tiles, slots):
    return slots[groups[v]], k, n

  def out_map(n, v, k, offsets, groups, tiles, slots):
    return tiles[v], n

  w_spec = pl.BlockSpec((pl.Squeezed(), tk, tn), w_map)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(N // tn, V, K // tk),
      in_specs=[pl.BlockSpec((tm, tk), lhs_map)] + [w_spec] * len(w_SKNs),
      out_specs=pl.BlockSpec((tm, tn), out_map),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * len(w_SKNs),
  )
  kind = "swiglu" if swiglu else "down"
  call = pl.pallas_call(
      functools.partial(_tpu_kernel, swiglu=swiglu, tm=tm),
      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name=f"expert_gmm_{kind}_tm{tm}_tk{tk}_tn{tn}",
  )
  return call(offsets_G1, group_V, tile_V, group_slots_G.astype(jnp.int32), lhs_MK, *w_SKNs)


# ---------------------------------------------------------------------------------------------
# GPU (Triton)


def _gpu_kernel(offsets_ref, group_ref, tile_ref, slots_ref, x_ref, *refs, swiglu: bool,
                tm: int, tk: int, tn: int, num_k: int):
  num_w = 2 if swiglu else 1
  w_refs, o_ref = refs[:num_w], refs[num_w]
  v, n = pl.program_id(0), pl.program_id(1)
  g = group_ref[v]
  slot = slots_ref[g]
  row0 = tile_ref[v] * tm

  def body(kk, accs):
    x = x_ref[pl.ds(row0, tm), pl.ds(kk * tk, tk)]
    return tuple(
        acc + pltriton.dot(x, w_ref[slot, pl.ds(kk * tk, tk), pl.ds(n * tn, tn)])
        for w_ref, acc in zip(w_refs, accs, strict=True))

  accs = jax.lax.fori_loop(0, num_k, body,
                           tuple(jnp.zeros((tm, tn), jnp.float32) for _ in w_refs))
  rows = row0 + jnp.arange(tm, dtype=jnp.int32)
  mask_t = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
  mask = jnp.broadcast_to(mask_t[:, None], (tm, tn))
  val = _epilogue(accs, swiglu).astype(o_ref.dtype)
  pltriton.store(o_ref.at[pl.ds(row0, tm), pl.ds(n * tn, tn)], val, mask=mask)


def gmm_gpu(lhs_MK, w_SKNs, group_slots_G, group_sizes_G, *, tiling: Tiling, out_dtype,
            swiglu: bool, interpret: bool = False):
  """Grouped matmul over the pool, GPU (Triton) kernel. Same arguments as `gmm_tpu`."""
  M, K = lhs_MK.shape
  N = w_SKNs[0].shape[2]
  tm, tk, tn = tiling
  offsets_G1, group_V, tile_V = visit_metadata(group_sizes_G, M, tm)
  V = group_V.shape[0]
  kind = "swiglu" if swiglu else "down"
  call = pl.pallas_call(
      functools.partial(_gpu_kernel, swiglu=swiglu, tm=tm, tk=tk, tn=tn, num_k=K // tk),
      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
      grid=(V, N // tn),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name=f"expert_gmm_{kind}_tm{tm}_tk{tk}_tn{tn}",
  )
  return call(offsets_G1, group_V, tile_V, group_slots_G.astype(jnp.int32), lhs_MK, *w_SKNs)
