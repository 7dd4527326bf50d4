"""Ragged paged attention, Pallas: a TPU (Mosaic) kernel and a GPU (Triton) kernel.

Both walk *work items*: a work item is up to `q_block` consecutive query tokens of one sequence
(a decode sequence is one item of one token; a prefill chunk of q tokens is ceil(q / q_block)
items). The number of items is bounded statically by W = min(T, ceil(T / q_block) + S). The
wrapper packs the queries per item as q_WKRH, rows R = q_block * G ordered (token, group), so a
kv head's query rows form one [R, H] matrix; outputs come back in the same layout and are
gathered to [T, N, H]. The packing and un-packing are plain gathers of q / out (small next to the
KV traffic). Each item runs flash-decoding style online softmax (f32) over the pages its last
token needs, skipping pages whose table entry is 0 (the null page) and masking keys after the
token's position (causal) and past kv_len (so garbage in a page tail is never used); a NaN in
a key or value the token does see is never masked, so it surfaces (the masking and the
finalisation are the reference's `mask_scores` and `finalize`).

TPU: grid (items, page blocks); `pages_per_block` pages per grid step, each page its own
BlockSpec whose index map reads the page table through scalar prefetch
(`pltpu.PrefetchScalarGridSpec`); page steps past the item's last page repeat the last block index
(no new DMA) and skip compute. The pool is viewed [num_pages, 2 * page_tokens * K, H] (free
reshape); kv head h of a page is the strided row set h, h + K, ... (K part) and
page_tokens * K + h, ... (V part). All K heads of a page are processed in one step.

GPU: Triton (`pallas.triton.CompilerParams`), grid (items, kv heads), a `fori_loop` over the
item's pages in the kernel, reading the page table from a ref; null pages skipped by `lax.cond`.
Needs R, page_tokens and H powers of two >= 16 (Triton dot).

Both pallas_calls take the page layout as arguments (`paged_attention_tpu`: the page view and
how to read a kv head's keys and values from a page's block; `paged_attention_gpu`: how to get
a page's scores and values), so the latent kernel (`latent_paged_attention`) runs on them too;
`attention_tpu` / `attention_gpu` are the K/V layout's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ragged_paged_attention.reference import (
  NEG_INF,
  WorkItems,
  finalize,
  mask_scores,
)


class BlockSizes(NamedTuple):
  """Tiling of the kernels.

  q_block: query tokens per work item (R = q_block * G rows per kv head).
  pages_per_block: pages per grid step (TPU kernel; the GPU kernel walks one page at a time).
  """

  q_block: int
  pages_per_block: int


# (backend, head_dim, page_tokens) -> BlockSizes. Starting points sized for VMEM / shared
# memory, not tuned on chips yet. Backends: "tpu", "gpu", "interpret".
BLOCK_SIZE_TABLE: dict[tuple[str, int, int], BlockSizes] = {
    ("tpu", 128, 16): BlockSizes(32, 8),
    ("tpu", 128, 32): BlockSizes(32, 4),
    ("tpu", 64, 16): BlockSizes(32, 8),
    ("gpu", 128, 16): BlockSizes(16, 1),
    ("gpu", 64, 16): BlockSizes(32, 1),
}


def default_block_sizes(backend: str, head_dim: int, page_tokens: int, group: int) -> BlockSizes:
  """Table entry for (backend, head_dim, page_tokens), else a heuristic.

  Args:
    backend: "tpu", "gpu" or "interpret".
    head_dim: H. page_tokens: tokens per page. group: G query heads per kv head.
  """
  entry = BLOCK_SIZE_TABLE.get((backend, head_dim, page_tokens))
  if entry is None:
    if backend == "tpu":
      entry = BlockSizes(32, max(1, 128 // page_tokens))
    elif backend == "gpu":
      entry = BlockSizes(16, 1)
    else:  # interpret: few, small steps
      entry = BlockSizes(8, 2)
  q_block = entry.q_block
  if backend == "gpu":  # Triton dot: R = q_block * G >= 16
    q_block = max(q_block, -(-16 // group))
  return BlockSizes(q_block, entry.pages_per_block)


def pack_queries(q_TNH, items: WorkItems, kv_heads: int, q_block: int):
  """q_TNH [T, N, H] -> q_WKRH [W, K, q_block * G, H]; rows of no token are 0."""
  T, N, H = q_TNH.shape
  G = N // kv_heads
  b_B = jnp.arange(q_block, dtype=jnp.int32)
  tok_WB = items.tok0_W[:, None] + b_B
  live_WB = b_B < items.rows_W[:, None]
  q_WBNH = jnp.where(live_WB[..., None, None], q_TNH[jnp.clip(tok_WB, 0, T - 1)], 0)
  W = q_WBNH.shape[0]
  q_WBKGH = q_WBNH.reshape(W, q_block, kv_heads, G, H)
  return q_WBKGH.transpose(0, 2, 1, 3, 4).reshape(W, kv_heads, q_block * G, H)


def unpack_outputs(out_WKRH, lse_WKR, items: WorkItems, q_block: int):
  """Item layout -> (out_TNH, lse_TN); padding tokens get 0 / -inf."""
  W, K, R, H = out_WKRH.shape
  G = R // q_block
  out_WKBGH = out_WKRH.reshape(W, K, q_block, G, H)
  lse_WKBG = lse_WKR.reshape(W, K, q_block, G)
  out_TKGH = out_WKBGH[items.tok_item_T, :, items.tok_row_T]
  lse_TKG = lse_WKBG[items.tok_item_T, :, items.tok_row_T]
  T = out_TKGH.shape[0]
  v_T = items.tok_valid_T
  out_TNH = jnp.where(v_T[:, None, None], out_TKGH.reshape(T, K * G, H), 0)
  lse_TN = jnp.where(v_T[:, None], lse_TKG.reshape(T, K * G), NEG_INF)
  return out_TNH.astype(out_WKRH.dtype), lse_TN.astype(jnp.float32)


def scaled_scores(q_RH, k_TH, sm_scale: float):
  """q_RH . k_TH^T * sm_scale, f32 [R, T]."""
  return jax.lax.dot_general(q_RH, k_TH, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * sm_scale


def online_update(s_RT, v_TV, m_R1, l_R1, acc_RV, *, kpos_T1, qpos_R1, live_R1, kv_len):
  """One page of flash attention for one kv head from its scaled scores s_RT; returns the new
  (m, l, acc) (f32)."""
  kpos_1T = kpos_T1.reshape(1, -1)
  s_RT = mask_scores(s_RT, (kpos_1T <= qpos_R1) & live_R1)
  m_new_R1 = jnp.maximum(m_R1, jnp.max(s_RT, axis=1, keepdims=True))
  # Only "no key yet" (-inf) is guarded. A NaN score reaches l and acc through p whether or not
  # the platform's max propagates it (Triton lowers max to maxnumf, which drops NaN), and
  # `finalize` keeps it. Unseen scores give exp(-inf - m_safe) = 0 exactly.
  m_safe_R1 = jnp.where(m_new_R1 == NEG_INF, 0.0, m_new_R1)
  p_RT = jnp.exp(s_RT - m_safe_R1)
  alpha_R1 = jnp.exp(m_R1 - m_safe_R1)
  l_new_R1 = alpha_R1 * l_R1 + jnp.sum(p_RT, axis=1, keepdims=True)
  v_TV = jnp.where(kpos_T1 < kv_len, v_TV, jnp.zeros_like(v_TV))  # page tail may be garbage
  pv_RV = jax.lax.dot_general(p_RT.astype(v_TV.dtype), v_TV, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
  return m_new_R1, l_new_R1, alpha_R1 * acc_RV + pv_RV


def row_positions(R: int, group: int, pos0, rows):
  """(qpos_R1, live_R1): absolute position and liveness of each (token, group) row."""
  # lax.div (truncating) not `//`: floor division lowers through `sign`, which Mosaic cannot
  # lower off-chip; rows are non-negative so both agree.
  r_R1 = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (R, 1), 0), jnp.int32(group))
  return pos0 + r_R1, r_R1 < rows


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)


def _tpu_kernel(tbl_ref, seq_ref, rows_ref, pos0_ref, npages_ref, kvl_ref, q_ref, *refs,
                ppb: int, pps: int, page_tokens: int, kv_heads: int, group: int, sm_scale: float,
                head_kv):
  page_refs = refs[:ppb]
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[ppb:]
  w, pb = pl.program_id(0), pl.program_id(1)
  s = seq_ref[w]
  npages = npages_ref[w]
  kv_len = kvl_ref[s]
  R = q_ref.shape[1]
  Tp, K = page_tokens, kv_heads

  @pl.when(pb == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  qpos_R1, live_R1 = row_positions(R, group, pos0_ref[w], rows_ref[w])
  for j in range(ppb):
    p = pb * ppb + j
    pid = tbl_ref[s * pps + jnp.minimum(p, pps - 1)]

    @pl.when((p < npages) & (pid != 0))
    def _(j=j, p=p):
      kpos_T1 = p * Tp + jax.lax.broadcasted_iota(jnp.int32, (Tp, 1), 0)
      for h in range(K):
        k_TH, v_TV = head_kv(page_refs[j], h)
        m, l, acc = online_update(scaled_scores(q_ref[h], k_TH, sm_scale), v_TV, m_sc[h],
                                  l_sc[h], acc_sc[h], kpos_T1=kpos_T1, qpos_R1=qpos_R1,
                                  live_R1=live_R1, kv_len=kv_len)
        m_sc[h], l_sc[h], acc_sc[h] = m, l, acc

  @pl.when(pb == pl.num_programs(1) - 1)
  def _():
    for h in range(K):
      out_RV, lse_R1 = finalize(m_sc[h], l_sc[h], acc_sc[h])
      o_ref[h] = out_RV.astype(o_ref.dtype)
      lse_ref[h] = lse_R1


def attention_tpu(q_WKRH, pool_PE, page_table_SP, items: WorkItems, kv_lens_S, *,
                  page_tokens: int, group: int, sm_scale: float, pages_per_block: int,
                  interpret: bool = False):
  """Work-item attention, TPU kernel (also the interpret-mode path).

  Args:
    q_WKRH: [W, K, R, H] packed queries (R = q_block * group rows per kv head).
    pool_PE: [num_pages, page_elems] the pool (viewed inside as [num_pages, 2*Tp*K, H]).
    page_table_SP: int32 [S, P] page ids; 0 = skipped.
    items: work-item metadata from `work_items`.
    kv_lens_S: int32 [S] context lengths.
    page_tokens: Tp. group: G. sm_scale: softmax scale.
    pages_per_block: pages per grid step.
    interpret: run with the Pallas interpreter.

  Returns:
    (out_WKRH in q's dtype, lse_WKR float32).
  """
  _, K, R, H = q_WKRH.shape
  Tp = page_tokens

  def head_kv(page_ref, h):
    return page_ref[pl.ds(h, Tp, stride=K), :], page_ref[pl.ds(Tp * K + h, Tp, stride=K), :]

  return paged_attention_tpu(
      q_WKRH, pool_PE.reshape(pool_PE.shape[0], 2 * Tp * K, H), page_table_SP, items, kv_lens_S,
      head_kv=head_kv, value_dim=H, page_tokens=Tp, group=group, sm_scale=sm_scale,
      pages_per_block=pages_per_block, interpret=interpret,
      name=f"ragged_paged_attention_tpu_R{R}_ppb{{ppb}}_Tp{Tp}_K{K}_H{H}")


def paged_attention_tpu(q_WKRH, pages_PXY, page_table_SP, items: WorkItems, kv_lens_S, *,
                        head_kv, value_dim: int, page_tokens: int, group: int, sm_scale: float,
                        pages_per_block: int, interpret: bool, name: str):
  """The TPU kernel over any page layout whose page is one [X, Y] block of `pages_PXY`.

  Args:
    q_WKRH: [W, K, R, H] packed queries.
    pages_PXY: [num_pages, X, Y] the pool viewed so that a page is one block.
    head_kv: (page ref [X, Y], kv head h) -> (keys [Tp, H], values [Tp, value_dim]) read from
      the page's VMEM block.
    value_dim: V, the values' head dim (out is [W, K, R, V]).
    name: the kernel's name; `{ppb}` in it is replaced by the pages per grid step.
    Others: as `attention_tpu`.

  Returns:
    (out_WKRV in q's dtype, lse_WKR float32).
  """
  W, K, R, H = q_WKRH.shape
  _, pps = page_table_SP.shape
  _, X, Y = pages_PXY.shape
  V = value_dim
  ppb = max(1, min(pages_per_block, pps))
  npb = -(-pps // ppb)

  def q_map(w, pb, *prefetch):
    return w, 0, 0, 0

  def page_map(w, pb, tbl, seq, rows, pos0, npages, kvl, *, j):
    # Past the item's last page: repeat the last page's block (no new DMA, compute skipped).
    p = jnp.minimum(pb * ppb + j, jnp.maximum(npages[w] - 1, 0))
    return tbl[seq[w] * pps + p], 0, 0

  page_specs = [pl.BlockSpec((pl.Squeezed(), X, Y), functools.partial(page_map, j=j))
                for j in range(ppb)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6,
      grid=(W, npb),
      in_specs=[pl.BlockSpec((pl.Squeezed(), K, R, H), q_map), *page_specs],
      out_specs=[pl.BlockSpec((pl.Squeezed(), K, R, V), q_map),
                 pl.BlockSpec((pl.Squeezed(), K, R, 1), q_map)],
      scratch_shapes=[pltpu.VMEM((K, R, 1), jnp.float32), pltpu.VMEM((K, R, 1), jnp.float32),
                      pltpu.VMEM((K, R, V), jnp.float32)],
  )
  kernel = functools.partial(_tpu_kernel, ppb=ppb, pps=pps, page_tokens=page_tokens,
                             kv_heads=K, group=group, sm_scale=sm_scale, head_kv=head_kv)
  call = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((W, K, R, V), q_WKRH.dtype),
                 jax.ShapeDtypeStruct((W, K, R, 1), jnp.float32)],
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name=name.format(ppb=ppb),
  )
  i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
  out_WKRV, lse_WKR1 = call(i32(page_table_SP).reshape(-1), items.seq_W, items.rows_W,
                            items.pos0_W, items.npages_W, i32(kv_lens_S), q_WKRH,
                            *([pages_PXY] * ppb))
  return out_WKRV, lse_WKR1[..., 0]


# ---------------------------------------------------------------------------------------------
# GPU (Triton)


def _gpu_kernel(tbl_ref, seq_ref, rows_ref, pos0_ref, npages_ref, kvl_ref, *refs, num_q: int,
                pps: int, page_tokens: int, group: int, page_scores_values):
  q_refs = refs[:num_q]
  pages_ref, o_ref, lse_ref = refs[num_q:]
  w, h = pl.program_id(0), pl.program_id(1)
  s = seq_ref[w]
  kv_len = kvl_ref[s]
  R, V = o_ref.shape
  Tp = page_tokens
  qpos_R1, live_R1 = row_positions(R, group, pos0_ref[w], rows_ref[w])
  qs = [q_ref[...] for q_ref in q_refs]

  def body(p, carry):
    pid = tbl_ref[s * pps + p]

    def attend(carry):
      m, l, acc = carry
      s_RT, v_TV = page_scores_values(qs, pages_ref, pid, h)
      kpos_T1 = p * Tp + jax.lax.broadcasted_iota(jnp.int32, (Tp, 1), 0)
      return online_update(s_RT, v_TV, m, l, acc, kpos_T1=kpos_T1, qpos_R1=qpos_R1,
                           live_R1=live_R1, kv_len=kv_len)

    return jax.lax.cond(pid != 0, attend, lambda c: c, carry)

  init = (jnp.full((R, 1), NEG_INF, jnp.float32), jnp.zeros((R, 1), jnp.float32),
          jnp.zeros((R, V), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, npages_ref[w], body, init)
  out_RV, lse_R1 = finalize(m, l, acc)
  o_ref[...] = out_RV.astype(o_ref.dtype)
  lse_ref[...] = lse_R1.reshape(R)


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def check_triton_dims(**dims: int) -> None:
  """Raises ValueError unless every named dim is a power of two >= 16 (Triton dot)."""
  for name, val in dims.items():
    if not (_is_pow2(val) and val >= 16):
      raise ValueError(f"the GPU (Triton) kernel needs {name} to be a power of two >= 16, got "
                       f"{val}; pick block_sizes accordingly or use impl='reference'")


def attention_gpu(q_WKRH, pool_PE, page_table_SP, items: WorkItems, kv_lens_S, *,
                  page_tokens: int, group: int, sm_scale: float, interpret: bool = False,
                  num_warps: int = 4, num_stages: int = 2):
  """Work-item attention, GPU (Triton) kernel. Arguments as `attention_tpu`.

  Raises ValueError unless R, page_tokens and H are powers of two >= 16 (Triton dot).
  """
  _, K, R, H = q_WKRH.shape
  check_triton_dims(**{"rows per item R = q_block * G": R, "page_tokens": page_tokens,
                       "head_dim": H})

  def page_scores_values(qs, pages_ref, pid, h):
    return (scaled_scores(qs[0], pages_ref[pid, 0, :, h, :], sm_scale),
            pages_ref[pid, 1, :, h, :])

  return paged_attention_gpu(
      [q_WKRH], pool_PE.reshape(pool_PE.shape[0], 2, page_tokens, K, H), page_table_SP, items,
      kv_lens_S, page_scores_values=page_scores_values, value_dim=H, page_tokens=page_tokens,
      group=group, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
      name=f"ragged_paged_attention_gpu_R{R}_Tp{page_tokens}_K{K}_H{H}")


def paged_attention_gpu(qs_WKR_, pages, page_table_SP, items: WorkItems, kv_lens_S, *,
                        page_scores_values, value_dim: int, page_tokens: int, group: int,
                        interpret: bool, num_warps: int, num_stages: int, name: str):
  """The GPU (Triton) kernel over any page layout: grid (items, kv heads), a loop over pages.

  Args:
    qs_WKR_: list of packed query parts, each [W, K, R, width] (a power of two each).
    pages: the pool in any view (left in place, read by `page_scores_values`).
    page_scores_values: (query parts [R, width] each, pages ref, page id, kv head h) ->
      (scaled scores [R, page_tokens] f32, values [page_tokens, value_dim]).
    value_dim: V (out is [W, K, R, V]).
    name: the kernel's name.
    Others: as `attention_gpu`.

  Returns:
    (out_WKRV in the queries' dtype, lse_WKR float32).
  """
  W, K, R, _ = qs_WKR_[0].shape
  S, pps = page_table_SP.shape
  whole = lambda shape: pl.BlockSpec(shape, lambda w, h: (0,) * len(shape))  # noqa: E731
  kernel = functools.partial(_gpu_kernel, num_q=len(qs_WKR_), pps=pps, page_tokens=page_tokens,
                             group=group, page_scores_values=page_scores_values)
  call = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((W, K, R, value_dim), qs_WKR_[0].dtype),
                 jax.ShapeDtypeStruct((W, K, R), jnp.float32)],
      grid=(W, K),
      in_specs=[whole((S * pps,)), *(whole((W,)) for _ in range(4)), whole((S,)),
                *(pl.BlockSpec((None, None, R, q.shape[-1]), lambda w, h: (w, h, 0, 0))
                  for q in qs_WKR_),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[pl.BlockSpec((None, None, R, value_dim), lambda w, h: (w, h, 0, 0)),
                 pl.BlockSpec((None, None, R), lambda w, h: (w, h, 0))],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=name,
  )
  i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
  return call(i32(page_table_SP).reshape(-1), items.seq_W, items.rows_W, items.pos0_W,
              items.npages_W, i32(kv_lens_S), *qs_WKR_, pages)
