"""The public ragged paged attention function and its host-side input validator."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._impl import resolve_impl
from pallas_kernels.ragged_paged_attention import kernel as _kernel
from pallas_kernels.ragged_paged_attention import reference as _reference
from pallas_kernels.ragged_paged_attention.layout import page_tokens_of, view_pages


def _need(cond, msg):
  if not cond:
    raise ValueError(msg)


def check_batch_shapes(q_TNH, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs):
  """Trace-time shape / dtype checks of a paged attention batch, whatever the page layout;
  raises ValueError naming the argument."""
  _need(q_TNH.ndim == 3, f"q_TNH must be [T, N, H], got shape {q_TNH.shape}")
  _need(q_TNH.shape[0] >= 1, "q_TNH must have at least one token row (pad if needed)")
  _need(jnp.issubdtype(q_TNH.dtype, jnp.floating), f"q_TNH must be floating, got {q_TNH.dtype}")
  _need(pool_PE.ndim == 2, f"pool_PE must be [num_pages, page_elems], got shape {pool_PE.shape}")
  _need(pool_PE.dtype == q_TNH.dtype,
        f"pool_PE dtype {pool_PE.dtype} must equal q_TNH dtype {q_TNH.dtype}")
  _need(page_table_SP.ndim == 2, f"page_table_SP must be [S, P], got shape {page_table_SP.shape}")
  S = page_table_SP.shape[0]
  _need(S >= 1 and page_table_SP.shape[1] >= 1, "page_table_SP must have S >= 1 and P >= 1, got "
        f"shape {page_table_SP.shape}")
  for name, a, shape in (("page_table_SP", page_table_SP, page_table_SP.shape),
                         ("cu_q_lens_S1", cu_q_lens_S1, (S + 1,)), ("kv_lens_S", kv_lens_S, (S,)),
                         ("num_seqs", num_seqs, (1,))):
    _need(a.shape == shape, f"{name} must have shape {shape}, got {a.shape}")
    _need(a.dtype == jnp.int32, f"{name} must be int32, got {a.dtype}")


def _check_shapes(q_TNH, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs, kv_heads,
                  head_dim):
  """Trace-time shape / dtype checks; raises ValueError naming the argument. Returns Tp."""
  check_batch_shapes(q_TNH, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs)
  _, N, H = q_TNH.shape
  _need(head_dim is None or head_dim == H,
        f"head_dim={head_dim} does not match q_TNH's last dim {H}")
  _need(isinstance(kv_heads, int) and kv_heads > 0, f"kv_heads must be a positive int, got "
        f"{kv_heads!r}")
  _need(N % kv_heads == 0, f"q_TNH's {N} query heads are not a multiple of kv_heads={kv_heads}")
  return page_tokens_of(pool_PE.shape[1], kv_heads, H)


def ragged_paged_attention(q_TNH: jax.Array, pool_PE: jax.Array, page_table_SP: jax.Array,
                           cu_q_lens_S1: jax.Array, kv_lens_S: jax.Array, num_seqs: jax.Array, *,
                           kv_heads: int, head_dim: int | None = None,
                           sm_scale: float | None = None, impl: str | None = None,
                           block_sizes: _kernel.BlockSizes | tuple[int, int] | None = None):
  """Causal GQA attention of a mixed prefill / decode batch over pages of the shared KV pool.

  Query token i of sequence s's chunk (q_len = cu[s+1] - cu[s] tokens) sits at absolute position
  kv_lens[s] - q_len + i and attends the keys at positions <= its own; key position j lives in
  page page_table_SP[s, j // page_tokens] at slot j % page_tokens (its K/V already written).
  Page-table entries equal to 0 are skipped (contribute nothing): a device holding only some of
  a sequence's pages computes its partial attention with the others set to 0, and partials
  merge exactly with `merge_attention`. Pages not in a live sequence's table, and slots a token
  does not see (past its position or its sequence's kv_len), never reach the result (they may
  hold NaN). Corruption in what a token does see surfaces instead of passing for "no key": for
  every token that sees a live K entry holding NaN or inf, out and lse are NaN in the query
  heads of that kv head; a NaN (inf) in a live V entry makes that head dim of out NaN (inf or
  NaN) and leaves lse as it was (lse depends on the scores only). Tokens before the corrupted
  position (same sequence) stay exact, except that the kernels may give them NaN from a
  corrupted V (a page's V enters one matmul for all query rows of a work item). Other
  sequences are never affected.

  Args:
    q_TNH: [T, N, H] queries of all sequences packed along T (float; N = kv_heads * G, query
      head n reads kv head n // G). Rows at or past cu_q_lens_S1[num_seqs] are padding.
    pool_PE: [num_pages, page_elems] the device's KV pool, same dtype as q; viewed as
      [num_pages, 2, page_tokens, kv_heads, H] (a reshape: page_elems must equal
      2 * page_tokens * kv_heads * H).
    page_table_SP: int32 [S, P] page ids of each sequence in order; 0 = skip.
    cu_q_lens_S1: int32 [S + 1] query start offsets (monotone up to num_seqs).
    kv_lens_S: int32 [S] total context length of each sequence, its new tokens included.
    num_seqs: int32 [1] number of real sequences; later rows of the tables are ignored.
    kv_heads: K, kv heads of the model.
    head_dim: optional H, checked against q_TNH.
    sm_scale: softmax scale, default 1 / sqrt(H).
    impl: "pallas" (Mosaic on TPU, Triton on GPU, chosen by the lowering platform),
      "interpret" (the TPU kernel in the Pallas interpreter), "reference" (plain jnp) or None
      (pallas on GPU/TPU, reference elsewhere).
    block_sizes: None (table keyed by (backend, H, page_tokens), heuristic fallback) or
      (q_block, pages_per_block) — see `kernel.BlockSizes`.

  Returns:
    (out_TNH in q's dtype, lse_TN float32 natural-log sum-exp of the scaled scores). Padding
    tokens and tokens that see no key get out 0 and lse -inf; NaN as above.
  """
  page_tokens = _check_shapes(q_TNH, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs,
                              kv_heads, head_dim)
  H = q_TNH.shape[-1]
  G = q_TNH.shape[1] // kv_heads
  sm_scale = float(1.0 / math.sqrt(H) if sm_scale is None else sm_scale)
  impl = resolve_impl(impl, pallas_backends=("gpu", "tpu"))
  if impl == "reference":
    pages = view_pages(pool_PE, kv_heads=kv_heads, head_dim=H)
    return _reference.ragged_paged_attention_reference(
        q_TNH, pages, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs, sm_scale=sm_scale)

  def run(backend, q_TNH, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs):
    if block_sizes is None:
      bs = _kernel.default_block_sizes(backend, H, page_tokens, G)
    else:
      bs = _kernel.BlockSizes(*block_sizes)
      _need(bs.q_block >= 1 and bs.pages_per_block >= 1,
            f"block_sizes must be positive, got {tuple(bs)}")
    items = _reference.work_items(cu_q_lens_S1, kv_lens_S, num_seqs,
                                  num_tokens=q_TNH.shape[0], q_block=bs.q_block,
                                  page_tokens=page_tokens, pages_per_seq=page_table_SP.shape[1])
    q_WKRH = _kernel.pack_queries(q_TNH, items, kv_heads, bs.q_block)
    common = dict(page_tokens=page_tokens, group=G, sm_scale=sm_scale)
    if backend == "gpu":
      out, lse = _kernel.attention_gpu(q_WKRH, pool_PE, page_table_SP, items, kv_lens_S,
                                       **common)
    else:
      out, lse = _kernel.attention_tpu(q_WKRH, pool_PE, page_table_SP, items, kv_lens_S,
                                       pages_per_block=bs.pages_per_block,
                                       interpret=backend == "interpret", **common)
    return _kernel.unpack_outputs(out, lse, items, bs.q_block)

  args = (q_TNH, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs)
  if impl == "interpret":
    return run("interpret", *args)
  # The kernel is picked by the platform being lowered for, not by a device query, so this
  # traces (and cross-lowers) on a machine without the accelerator.
  return jax.lax.platform_dependent(
      *args, tpu=lambda *a: run("tpu", *a), cuda=lambda *a: run("gpu", *a))


def validate_inputs(q_TNH, pool_PE, page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs, *,
                    kv_heads: int) -> None:
  """Host-side value checks (numpy); raises ValueError naming the argument and the index.

  Checks, for the live sequences s < num_seqs: page ids in [0, num_pages); kv_lens <=
  P * page_tokens; 0 <= q_len <= kv_len; cu_q_lens monotone from cu_q_lens[0] >= 0 to
  cu_q_lens[num_seqs] <= T; 0 <= num_seqs <= S. Also the static shape checks. Arguments as
  `ragged_paged_attention` (numpy or jax arrays).
  """
  arrs = [np.asarray(a) for a in (page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs)]
  page_tokens = _check_shapes(
      jax.ShapeDtypeStruct(q_TNH.shape, q_TNH.dtype),
      jax.ShapeDtypeStruct(pool_PE.shape, pool_PE.dtype),
      *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrs), kv_heads, None)
  validate_batch_values(*arrs, num_tokens=q_TNH.shape[0], num_pages=pool_PE.shape[0],
                        page_tokens=page_tokens)


def validate_batch_values(page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs, *, num_tokens: int,
                          num_pages: int, page_tokens: int) -> None:
  """The host-side value checks of `validate_inputs` (numpy), whatever the page layout."""
  page_table, cu, kv_lens, n_arr = (np.asarray(a) for a in (page_table_SP, cu_q_lens_S1,
                                                           kv_lens_S, num_seqs))
  T = num_tokens
  S, P = page_table.shape
  n = int(n_arr[0])
  if not 0 <= n <= S:
    raise ValueError(f"num_seqs={n} must be in [0, max_seqs={S}]")
  live = page_table[:n]
  bad = np.argwhere((live < 0) | (live >= num_pages))
  if bad.size:
    s, p = bad[0]
    raise ValueError(f"page_table_SP[{s}, {p}]={live[s, p]} is outside [0, num_pages="
                     f"{num_pages})")
  if cu[0] < 0:
    raise ValueError(f"cu_q_lens_S1[0]={cu[0]} must be >= 0")
  q_lens = np.diff(cu[:n + 1])
  bad = np.flatnonzero(q_lens < 0)
  if bad.size:
    i = bad[0]
    raise ValueError(f"cu_q_lens_S1 must be non-decreasing: cu_q_lens_S1[{i + 1}]="
                     f"{cu[i + 1]} < cu_q_lens_S1[{i}]={cu[i]}")
  if cu[n] > T:
    raise ValueError(f"cu_q_lens_S1[num_seqs={n}]={cu[n]} exceeds the {T} query tokens of q_TNH")
  cap = P * page_tokens
  bad = np.flatnonzero((kv_lens[:n] < 0) | (kv_lens[:n] > cap))
  if bad.size:
    s = bad[0]
    raise ValueError(f"kv_lens_S[{s}]={kv_lens[s]} must be in [0, pages_per_seq * page_tokens "
                     f"= {P} * {page_tokens} = {cap}]")
  bad = np.flatnonzero(q_lens > kv_lens[:n])
  if bad.size:
    s = bad[0]
    raise ValueError(f"sequence {s} has q_len={q_lens[s]} (from cu_q_lens_S1) > kv_lens_S[{s}]="
                     f"{kv_lens[s]}: the new tokens must be counted in kv_lens")
