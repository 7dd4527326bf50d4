"""Latent paged attention, Pallas: a TPU (Mosaic) kernel and a GPU (Triton) kernel.

The ragged paged attention kernels' work items, online softmax and masking
(`ragged_paged_attention.kernel.paged_attention_tpu` / `paged_attention_gpu`) over latent pages:
one kv head, so the N query heads of up to q_block tokens are the R = q_block * N rows of an
item; a key is a whole row (D = A + rope), its value the row's first A = kv_lora_rank columns.

TPU: a page is one [page_tokens, D] VMEM block; the scores are one [R, D] x [D, page_tokens]
matmul, the values the block's first A columns.

GPU: Triton needs power-of-two block shapes, and D (576 for DeepSeek) is not one: the queries
travel as their latent part [R, A] and rope part [R, rope], the scores are the sum of two dots
over the page's two column ranges, the latent range is also the values. Needs R, page_tokens,
A and rope powers of two >= 16.
"""

from __future__ import annotations

from jax.experimental import pallas as pl

from pallas_kernels.ragged_paged_attention.kernel import (
  BlockSizes,
  WorkItems,
  check_triton_dims,
  paged_attention_gpu,
  paged_attention_tpu,
  scaled_scores,
)


def default_block_sizes(backend: str, num_heads: int, page_tokens: int) -> BlockSizes:
  """Block sizes for N = `num_heads` query heads sharing the one latent kv head.

  Starting points, not tuned on chips: TPU items of about 256 rows (R = q_block * N; a decode
  token of 128 heads is one item) and 128 tokens of pages per grid step; GPU the fewest tokens
  with R >= 16 (Triton dot), one page at a time; interpret small steps.
  """
  if backend == "tpu":
    return BlockSizes(max(1, 256 // num_heads), max(1, 128 // page_tokens))
  if backend == "gpu":
    return BlockSizes(max(1, -(-16 // num_heads)), 1)
  return BlockSizes(max(1, 8 // num_heads), 2)


def attention_tpu(q_W1RD, pool_PE, page_table_SP, items: WorkItems, kv_lens_S, *,
                  kv_lora_rank: int, page_tokens: int, group: int, sm_scale: float,
                  pages_per_block: int, interpret: bool = False):
  """Work-item latent attention, TPU kernel (also the interpret-mode path).

  Args:
    q_W1RD: [W, 1, R, D] packed absorbed queries (`pack_queries` with kv_heads 1).
    pool_PE: [num_pages, page_elems] the pool (viewed inside as [num_pages, page_tokens, D]).
    page_table_SP: int32 [S, P] page ids; 0 = skipped.
    items: work-item metadata from `work_items`.
    kv_lens_S: int32 [S] context lengths.
    kv_lora_rank: A. page_tokens: Tp. group: G = N (all heads read the one kv head).
    sm_scale: softmax scale. pages_per_block: pages per grid step.
    interpret: run with the Pallas interpreter.

  Returns:
    (out_W1RA in q's dtype, lse_W1R float32).
  """
  _, _, R, D = q_W1RD.shape
  A = kv_lora_rank

  def head_kv(page_ref, h):
    return page_ref[...], page_ref[:, pl.ds(0, A)]

  return paged_attention_tpu(
      q_W1RD, pool_PE.reshape(pool_PE.shape[0], page_tokens, D), page_table_SP, items,
      kv_lens_S, head_kv=head_kv, value_dim=A, page_tokens=page_tokens, group=group,
      sm_scale=sm_scale, pages_per_block=pages_per_block, interpret=interpret,
      name=f"latent_paged_attention_tpu_R{R}_ppb{{ppb}}_Tp{page_tokens}_A{A}_D{D}")


def attention_gpu(q_W1RD, pool_PE, page_table_SP, items: WorkItems, kv_lens_S, *,
                  kv_lora_rank: int, page_tokens: int, group: int, sm_scale: float,
                  interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """Work-item latent attention, GPU (Triton) kernel. Arguments as `attention_tpu`.

  Raises ValueError unless R, page_tokens, A and the rope width D - A are powers of two >= 16.
  """
  _, _, R, D = q_W1RD.shape
  A, O = kv_lora_rank, D - kv_lora_rank
  check_triton_dims(**{"rows per item R = q_block * N": R, "page_tokens": page_tokens,
                       "kv_lora_rank": A, "the rope width": O})

  def page_scores_values(qs, pages_ref, pid, h):
    q_lat_RA, q_rope_RO = qs
    k_lat_TA = pages_ref[pid, :, pl.ds(0, A)]
    k_rope_TO = pages_ref[pid, :, pl.ds(A, O)]
    s_RT = (scaled_scores(q_lat_RA, k_lat_TA, sm_scale)
            + scaled_scores(q_rope_RO, k_rope_TO, sm_scale))
    return s_RT, k_lat_TA

  return paged_attention_gpu(
      [q_W1RD[..., :A], q_W1RD[..., A:]],
      pool_PE.reshape(pool_PE.shape[0], page_tokens, D), page_table_SP, items, kv_lens_S,
      page_scores_values=page_scores_values, value_dim=A, page_tokens=page_tokens,
      group=group, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
      name=f"latent_paged_attention_gpu_R{R}_Tp{page_tokens}_A{A}_D{D}")

