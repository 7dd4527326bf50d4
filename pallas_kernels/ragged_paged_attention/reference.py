"""Ragged paged attention in plain jnp: the oracle of the kernels and the CPU path.

Glossary: T query tokens (packed over sequences), N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, S sequences (max_seqs), P pages per sequence in a page table,
L = P * page_tokens key positions of a sequence, V the values' head dim where it differs
from H (`attend_pages` over latent pages). Query head n reads kv head n // G.

Vectorised over work items (`work_items`: up to q_block consecutive query tokens of one
sequence; a decode token is an item of its own): each item gathers the pages of its own
sequence with index arrays (`pages[page_table[seq]]`), never a dynamic slice of the pool, and
attends causally, a chunk of pages at a time with an online softmax, over the chunks between
the first and the last page any prefix needs (the batch's longest sequence, on the pages the
table holds). The Pallas kernels walk the same work items.

NaN safety, both ways: a position a token does not see (another sequence's page, a skipped page,
a slot past its position) never reaches a result, whatever it holds (its score is selected to
-inf, its V row to 0, never multiplied by 0); a position it sees is never masked, so a NaN or inf
there surfaces in the result (NaN; an inf in V may give inf) instead of passing for "no key".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def mask_scores(s, seen):
  """Scores of unseen positions -> -inf; a seen score of -inf (an inf in K) -> NaN.

  A score of finite q and K is -inf only if q.k overflows float32, so a seen -inf comes from
  corrupted K (an inf, or a value near the float limit): as NaN it surfaces in the output
  instead of silently weighing 0.
  """
  return jnp.where(seen, jnp.where(s == NEG_INF, jnp.nan, s), NEG_INF)


def finalize(m, l, acc):
  """Output and LSE of an online softmax from its running max, sum and accumulator.

  Only l == 0 means "saw no key" (out 0, since acc is 0 then, and lse -inf, since m is): a
  NaN that a seen score left in m or l stays NaN instead of passing for empty (a NaN value
  leaves m and l finite and makes acc, so out, NaN).

  Args:
    m: [..., 1] running max of the scores (-inf while no key was seen).
    l: [..., 1] running sum of exp(score - m).
    acc: [..., H] running sum of exp(score - m) * v.

  Returns:
    (out [..., H] = acc / l, lse [..., 1] = m + log(l)), float32.
  """
  l_safe = jnp.where(l == 0, 1.0, l)
  return acc / l_safe, m + jnp.log(l_safe)


def token_metadata(cu_q_lens_S1: jax.Array, kv_lens_S: jax.Array, num_seqs: jax.Array,
                   num_tokens: int):
  """Sequence and absolute position of every query token.

  Args:
    cu_q_lens_S1: int32 [S + 1] query start offsets; entries past num_seqs are ignored.
    kv_lens_S: int32 [S] context length of each sequence, its new tokens included.
    num_seqs: int32 [1] number of real sequences.
    num_tokens: T.

  Returns:
    (seq_T, pos_T, valid_T): int32 sequence of each token, int32 absolute position of each
    token in its sequence, bool False for padding tokens (at or past cu_q_lens[num_seqs]).
  """
  S = kv_lens_S.shape[0]
  n = jnp.clip(num_seqs.reshape(()).astype(jnp.int32), 0, S)
  cu_S1 = cu_q_lens_S1.astype(jnp.int32)
  big = jnp.iinfo(jnp.int32).max
  # Entries past num_seqs may be garbage: make them +inf so the search below stays monotone.
  cu_S1 = jnp.where(jnp.arange(S + 1) <= n, cu_S1, big)
  t_T = jnp.arange(num_tokens, dtype=jnp.int32)
  seq_T = jnp.searchsorted(cu_S1[1:], t_T, side="right").astype(jnp.int32)
  valid_T = (t_T < cu_S1[n]) & (t_T >= cu_S1[0]) & (seq_T < n)
  seq_T = jnp.clip(seq_T, 0, S - 1)
  q_len_T = cu_S1[seq_T + 1] - cu_S1[seq_T]
  pos_T = kv_lens_S.astype(jnp.int32)[seq_T] - q_len_T + (t_T - cu_S1[seq_T])
  return seq_T, pos_T, valid_T


class WorkItems(NamedTuple):
  """Per work item (W of them) and per token (T) metadata; all int32 except tok_valid_T."""

  seq_W: jax.Array  # sequence of the item
  rows_W: jax.Array  # real query tokens in the item (0 for padding items)
  pos0_W: jax.Array  # absolute position of the item's first token
  npages_W: jax.Array  # pages the item visits: ceil((last position + 1) / page_tokens)
  tok0_W: jax.Array  # index in T of the item's first token
  tok_item_T: jax.Array  # item of each token
  tok_row_T: jax.Array  # row (token index) of each token inside its item
  tok_valid_T: jax.Array  # bool, False for padding tokens


def num_work_items(num_tokens: int, max_seqs: int, q_block: int) -> int:
  """Static bound W on the work items of a batch."""
  return max(1, min(num_tokens, -(-num_tokens // q_block) + max_seqs))


def work_items(cu_q_lens_S1, kv_lens_S, num_seqs, *, num_tokens: int, q_block: int,
               page_tokens: int, pages_per_seq: int) -> WorkItems:
  """Cuts each sequence's query tokens into items of q_block tokens (vectorised jnp)."""
  S = kv_lens_S.shape[0]
  W = num_work_items(num_tokens, S, q_block)
  n = jnp.clip(num_seqs.reshape(()).astype(jnp.int32), 0, S)
  cu_S1 = cu_q_lens_S1.astype(jnp.int32)
  live_S = jnp.arange(S) < n
  q_len_S = jnp.where(live_S, cu_S1[1:] - cu_S1[:-1], 0)
  kv_len_S = kv_lens_S.astype(jnp.int32)
  blocks_S = (q_len_S + q_block - 1) // q_block
  end_S = jnp.cumsum(blocks_S)
  start_S = end_S - blocks_S
  w_W = jnp.arange(W, dtype=jnp.int32)
  seq_W = jnp.clip(jnp.searchsorted(end_S, w_W, side="right"), 0, S - 1).astype(jnp.int32)
  real_W = w_W < end_S[-1]
  j_W = w_W - start_S[seq_W]
  rows_W = jnp.where(real_W, jnp.clip(q_len_S[seq_W] - j_W * q_block, 0, q_block), 0)
  pos0_W = kv_len_S[seq_W] - q_len_S[seq_W] + j_W * q_block
  last_W = pos0_W + rows_W - 1
  npages_W = jnp.where(rows_W > 0,
                       jnp.clip((last_W + page_tokens) // page_tokens, 0, pages_per_seq), 0)
  tok0_W = cu_S1[seq_W] + j_W * q_block
  # Tokens -> (item, row).
  seq_T, _, tok_valid_T = token_metadata(cu_q_lens_S1, kv_lens_S, num_seqs, num_tokens)
  off_T = jnp.arange(num_tokens, dtype=jnp.int32) - cu_S1[seq_T]
  tok_item_T = jnp.clip(start_S[seq_T] + off_T // q_block, 0, W - 1)
  tok_row_T = jnp.clip(off_T % q_block, 0, q_block - 1)
  as32 = lambda a: a.astype(jnp.int32)  # noqa: E731
  return WorkItems(as32(seq_W), as32(rows_W), as32(pos0_W), as32(npages_W), as32(tok0_W),
                   as32(tok_item_T), as32(tok_row_T), tok_valid_T)


def default_q_block(num_tokens: int, max_seqs: int) -> int:
  """Query tokens per work item of the reference: 1 for decode, up to 8 for prefill chunks.

  The mean query tokens per sequence rounded up to a power of two, at most 8 (measured on
  CPU: 8-token items beat 16 and 32 on a batch of 32-token prefill chunks).
  """
  mean = -(-num_tokens // max(max_seqs, 1))
  return min(8, 1 << (mean - 1).bit_length())


def ragged_paged_attention_reference(q_TNH: jax.Array, pages_P2TKH: jax.Array,
                                     page_table_SP: jax.Array, cu_q_lens_S1: jax.Array,
                                     kv_lens_S: jax.Array, num_seqs: jax.Array, *,
                                     sm_scale: float, chunk_pages: int = 8,
                                     q_block: int | None = None):
  """Ragged paged attention, plain jnp (see `api.ragged_paged_attention` for the contract).

  `attend_pages` over K/V pages: a page's K is `pages_P2TKH[:, 0]`, its V `pages_P2TKH[:, 1]`.

  Args:
    q_TNH: [T, N, H] queries.
    pages_P2TKH: [num_pages, 2, page_tokens, K, H] the viewed pool.
    page_table_SP: int32 [S, P] page ids of each sequence; 0 = skipped.
    cu_q_lens_S1: int32 [S + 1] query start offsets.
    kv_lens_S: int32 [S] context lengths including the new tokens.
    num_seqs: int32 [1] real sequences.
    sm_scale: softmax scale.
    chunk_pages: pages per step of the prefix loop (memory: W * chunk_pages * page_tokens * K *
      H for W work items).
    q_block: query tokens per work item; None: `default_q_block(T, S)`.

  Returns:
    (out_TNH in q's dtype, lse_TN float32); padding tokens and tokens that see no key give
    out 0 and lse -inf.
  """
  _, _, page_tokens, K, H = pages_P2TKH.shape
  return attend_pages(
      q_TNH, lambda pids: (pages_P2TKH[pids, 0], pages_P2TKH[pids, 1]),
      lambda pids, slots: (pages_P2TKH[pids, 0, slots], pages_P2TKH[pids, 1, slots]),
      page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs, page_tokens=page_tokens, kv_heads=K,
      value_dim=H, sm_scale=sm_scale, chunk_pages=chunk_pages, q_block=q_block)


def prefix_chunk_range(table_WP: jax.Array, prefix_W: jax.Array, *, page_tokens: int,
                       chunk_pages: int) -> tuple[jax.Array, jax.Array]:
  """The chunks of `chunk_pages` pages the prefix loop must visit: [first, stop), int32.

  A page is needed if some item's prefix reaches it (its first position is before the item's
  first token) and its table entry is not 0. Chunks before the first needed page and after
  the last hold only keys no token sees, and an online-softmax step over keys all unseen
  changes nothing (bit for bit), so they are skipped: a device holding the tail of a long
  sequence (the head's entries 0 there) starts where its pages start, the device holding the
  head stops where they end, and the cost of a spread sequence is split, not repeated. (0, 0)
  if no page is needed.

  Args:
    table_WP: int32 [W, P'] each item's page table, P' a multiple of chunk_pages.
    prefix_W: int32 [W] keys before each item's first token (0 for padding items).
  """
  page_P = jnp.arange(table_WP.shape[1], dtype=jnp.int32)
  needed_P = jnp.any((table_WP != 0) & (page_P * page_tokens < prefix_W[:, None]), axis=0)
  first_page = jnp.argmax(needed_P).astype(jnp.int32)
  last_page = (table_WP.shape[1] - 1 - jnp.argmax(needed_P[::-1])).astype(jnp.int32)
  first = first_page // chunk_pages
  stop = jnp.where(needed_P.any(), last_page // chunk_pages + 1, first)
  return first, stop


def attend_pages(q_TNH: jax.Array, page_kv, slot_kv, page_table_SP: jax.Array,
                 cu_q_lens_S1: jax.Array, kv_lens_S: jax.Array, num_seqs: jax.Array, *,
                 page_tokens: int, kv_heads: int, value_dim: int, sm_scale: float,
                 chunk_pages: int = 8, q_block: int | None = None):
  """Ragged paged attention over any page layout, given how to read a page's keys and values.

  Work items of `q_block` consecutive query tokens of one sequence (`work_items`) gather their
  sequence's pages once for all their tokens (a prefill chunk does not gather its context once
  per token). An item's keys fall in two sets: the *prefix*, positions before its first token,
  which every token of the item sees, and the *diagonal*, its own tokens' positions, each seen
  by the tokens at or after it. The prefix runs an online softmax over chunks of
  `chunk_pages` pages, from the first chunk holding a page some prefix needs to the last one
  (`prefix_chunk_range`; a `fori_loop` with traced bounds: the cost follows the batch's
  longest context on this device's pages, not the page table's width, max_context; a table of
  one chunk needs no loop); the diagonal (at most q_block keys) is one
  last update with a per-token mask, so a token never multiplies a value it does not see, even
  by a zero weight. An item of one token (q_block 1, decode) has its own position in the
  prefix and no diagonal step.

  Args:
    q_TNH: [T, N, H] queries (N = kv_heads * G).
    page_kv: page ids [W, C] -> (keys [W, C, page_tokens, K, H], values [W, C, page_tokens, K,
      value_dim]) of those pages (gathered by index, never a dynamic slice of the pool).
    slot_kv: (page ids [W, J], slots [W, J]) -> (keys [W, J, K, H], values [W, J, K,
      value_dim]) of those token slots.
    page_table_SP, cu_q_lens_S1, kv_lens_S, num_seqs, sm_scale, chunk_pages, q_block: as
      `ragged_paged_attention_reference`.
    page_tokens: tokens per page. kv_heads: K. value_dim: the values' head dim.

  Returns:
    (out_TNV [T, N, value_dim] in q's dtype, lse_TN float32); padding tokens and tokens that
    see no key give out 0 and lse -inf.
  """
  T, N, H = q_TNH.shape
  K, Hv = kv_heads, value_dim
  G = N // K
  S, P = page_table_SP.shape
  B = q_block or default_q_block(T, S)
  C = max(1, min(chunk_pages, P))
  chunks = -(-P // C)
  CL = C * page_tokens
  items = work_items(cu_q_lens_S1, kv_lens_S, num_seqs, num_tokens=T, q_block=B,
                     page_tokens=page_tokens, pages_per_seq=P)
  W = items.seq_W.shape[0]
  table_SP = jnp.pad(page_table_SP.astype(jnp.int32), ((0, 0), (0, chunks * C - P)))
  table_WP = table_SP[items.seq_W]
  b_B = jnp.arange(B, dtype=jnp.int32)
  live_WB = b_B < items.rows_W[:, None]
  tok_WB = jnp.clip(items.tok0_W[:, None] + b_B, 0, T - 1)
  q_WBKGH = jnp.where(live_WB[..., None, None], q_TNH[tok_WB].astype(jnp.float32), 0.0)
  q_WBKGH = q_WBKGH.reshape(W, B, K, G, H)
  # Keys every token of the item sees: those before its first token, and for an item of one
  # token (decode) its own as well, so that the diagonal step below is not needed.
  prefix_W = jnp.where(items.rows_W > 0, items.pos0_W + (B == 1), 0)

  def scores_update(m_WKGB, l_WKGB, k_WLKH, seen_WBL):
    """Online-softmax step over keys [W, L]: (new max, new sum, alpha, weights p_WKGBL)."""
    s_WKGBL = jnp.einsum("wbkgh,wlkh->wkgbl", q_WBKGH, k_WLKH.astype(jnp.float32),
                         precision="highest") * sm_scale
    s_WKGBL = mask_scores(s_WKGBL, seen_WBL[:, None, None])
    m_new_WKGB = jnp.maximum(m_WKGB, jnp.max(s_WKGBL, axis=-1))
    # Only "no key yet" (-inf) is guarded: a NaN max stays NaN and poisons the row. Unseen
    # scores give exp(-inf - m_safe) = 0 exactly, as does alpha while m was -inf.
    m_safe_WKGB = jnp.where(m_new_WKGB == NEG_INF, 0.0, m_new_WKGB)
    p_WKGBL = jnp.exp(s_WKGBL - m_safe_WKGB[..., None])
    alpha_WKGB = jnp.exp(m_WKGB - m_safe_WKGB)
    return m_new_WKGB, alpha_WKGB * l_WKGB + jnp.sum(p_WKGBL, axis=-1), alpha_WKGB, p_WKGBL

  def prefix_chunk(c, carry):
    m_WKGB, l_WKGB, acc_WKGBV = carry
    pids_WC = jax.lax.dynamic_slice_in_dim(table_WP, c * C, C, axis=1)
    l_L = c * CL + jnp.arange(CL, dtype=jnp.int32)
    seen_WL = (l_L[None] < prefix_W[:, None]) & jnp.repeat(pids_WC != 0, page_tokens, axis=1)
    k_WCTKH, v_WCTKV = page_kv(pids_WC)
    k_WLKH = k_WCTKH.reshape(W, CL, K, H)
    # Garbage (NaN) in unseen slots: its scores are selected to -inf and its V rows to 0, so
    # it never reaches a product (p = 0 would not cancel a NaN V).
    v_WLKV = jnp.where(seen_WL[..., None, None],
                       v_WCTKV.reshape(W, CL, K, Hv).astype(jnp.float32), 0.0)
    m_WKGB, l_WKGB, alpha_WKGB, p_WKGBL = scores_update(
        m_WKGB, l_WKGB, k_WLKH, seen_WL[:, None] & live_WB[..., None])
    acc_WKGBV = alpha_WKGB[..., None] * acc_WKGBV + jnp.einsum(
        "wkgbl,wlkh->wkgbh", p_WKGBL, v_WLKV, precision="highest")
    return m_WKGB, l_WKGB, acc_WKGBV

  def diagonal(m_WKGB, l_WKGB, acc_WKGBV):
    """The item's own positions: key j (position pos0 + j) is seen by its rows b >= j."""
    pos_WJ = items.pos0_W[:, None] + b_B
    pids_WJ = jnp.take_along_axis(table_WP, jnp.clip(pos_WJ // page_tokens, 0, P - 1), axis=1)
    seen_WBJ = ((b_B[None, None, :] <= b_B[None, :, None]) & live_WB[..., None]
                & (pids_WJ != 0)[:, None, :])
    k_WJKH, v_WJKV = slot_kv(pids_WJ, pos_WJ % page_tokens)
    v_WBJKV = jnp.where(seen_WBJ[..., None, None], v_WJKV.astype(jnp.float32)[:, None], 0.0)
    m_WKGB, l_WKGB, alpha_WKGB, p_WKGBJ = scores_update(m_WKGB, l_WKGB, k_WJKH, seen_WBJ)
    acc_WKGBV = alpha_WKGB[..., None] * acc_WKGBV + jnp.einsum(
        "wkgbj,wbjkh->wkgbh", p_WKGBJ, v_WBJKV, precision="highest")
    return m_WKGB, l_WKGB, acc_WKGBV

  init = (jnp.full((W, K, G, B), NEG_INF, jnp.float32), jnp.zeros((W, K, G, B), jnp.float32),
          jnp.zeros((W, K, G, B, Hv), jnp.float32))
  if chunks == 1:  # the whole table in one chunk: no loop (a chunk seeing nothing is a no-op)
    m_WKGB, l_WKGB, acc_WKGBV = prefix_chunk(0, init)
  else:
    first, stop = prefix_chunk_range(table_WP, prefix_W, page_tokens=page_tokens,
                                     chunk_pages=C)
    m_WKGB, l_WKGB, acc_WKGBV = jax.lax.fori_loop(first, stop, prefix_chunk, init)
  if B > 1:
    m_WKGB, l_WKGB, acc_WKGBV = diagonal(m_WKGB, l_WKGB, acc_WKGBV)
  out_WKGBV, lse_WKGB1 = finalize(m_WKGB[..., None], l_WKGB[..., None], acc_WKGBV)
  item_T, row_T, valid_T = items.tok_item_T, items.tok_row_T, items.tok_valid_T
  out_TKGV = out_WKGBV.transpose(0, 3, 1, 2, 4)[item_T, row_T]
  lse_TKG = lse_WKGB1[..., 0].transpose(0, 3, 1, 2)[item_T, row_T]
  out_TNV = jnp.where(valid_T[:, None, None], out_TKGV.reshape(T, N, Hv), 0.0)
  lse_TN = jnp.where(valid_T[:, None], lse_TKG.reshape(T, N), NEG_INF)
  return out_TNV.astype(q_TNH.dtype), lse_TN


def merge_attention(outs, lses):
  """Exact merge of attention partials computed over disjoint key sets.

  A partial with lse -inf saw no key and weighs exactly nothing (its out is ignored, even if
  NaN). Every other partial is weighed, so a NaN in its out or lse (a corrupted key or value it
  saw) makes the merged out NaN, even where its weight underflows to 0.

  Args:
    outs: [M, T, N, H] (or a list of M arrays [T, N, H]) normalised partial outputs.
    lses: [M, T, N] (or a list) float32 log-sum-exp of each partial; -inf = saw no key.

  Returns:
    (out [T, N, H] in the partials' dtype, lse [T, N] float32); out 0 / lse -inf where no
    partial saw a key.
  """
  outs_M = jnp.stack(list(outs)) if isinstance(outs, (list, tuple)) else outs
  lses_M = jnp.stack(list(lses)) if isinstance(lses, (list, tuple)) else lses
  if outs_M.shape[:-1] != lses_M.shape:
    raise ValueError(f"outs {outs_M.shape} and lses {lses_M.shape} do not match "
                     "(want [M, T, N, H] and [M, T, N])")
  lses_M = lses_M.astype(jnp.float32)
  m = jnp.max(lses_M, axis=0)
  w_M = jnp.exp(lses_M - jnp.where(m == NEG_INF, 0.0, m))  # exp(-inf) = 0: empty weigh nothing
  w_sum = jnp.sum(w_M, axis=0)
  w_sum_safe = jnp.where(w_sum == 0, 1.0, w_sum)  # 0 only if every partial is empty
  parts = jnp.where((lses_M == NEG_INF)[..., None], 0.0, outs_M.astype(jnp.float32))
  out = jnp.sum((w_M / w_sum_safe)[..., None] * parts, axis=0)
  return out.astype(outs_M.dtype), m + jnp.log(w_sum_safe)
