"""Ragged paged attention in plain jnp: the oracle of the kernels and the CPU path.

Glossary: T query tokens (packed over sequences), N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, S sequences (max_seqs), P pages per sequence in a page table,
L = P * page_tokens key positions of a sequence. Query head n reads kv head n // G.

Vectorised over tokens: each token gathers the pages of its own sequence with index arrays
(`pages[page_table[seq]]`), never a dynamic slice of the pool, and attends causally, a chunk of
pages at a time with an online softmax, for as many chunks as the batch's longest sequence.

NaN safety, both ways: a position a token does not see (another sequence's page, a skipped page,
a slot past its position) never reaches a result, whatever it holds (its score is selected to
-inf, its V row to 0, never multiplied by 0); a position it sees is never masked, so a NaN or inf
there surfaces in the result (NaN; an inf in V may give inf) instead of passing for "no key".
"""

from __future__ import annotations

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


def ragged_paged_attention_reference(q_TNH: jax.Array, pages_P2TKH: jax.Array,
                                     page_table_SP: jax.Array, cu_q_lens_S1: jax.Array,
                                     kv_lens_S: jax.Array, num_seqs: jax.Array, *,
                                     sm_scale: float, chunk_pages: int = 8):
  """Ragged paged attention, plain jnp (see `api.ragged_paged_attention` for the contract).

  Online softmax over chunks of `chunk_pages` pages of every token's page table, for as many
  chunks as the longest real sequence needs (a `fori_loop` with a traced trip count): the cost
  follows the batch's longest context, not the page table's width (max_context).

  Args:
    q_TNH: [T, N, H] queries.
    pages_P2TKH: [num_pages, 2, page_tokens, K, H] the viewed pool.
    page_table_SP: int32 [S, P] page ids of each sequence; 0 = skipped.
    cu_q_lens_S1: int32 [S + 1] query start offsets.
    kv_lens_S: int32 [S] context lengths including the new tokens.
    num_seqs: int32 [1] real sequences.
    sm_scale: softmax scale.
    chunk_pages: pages per step of the loop (memory: T * chunk_pages * page_tokens * K * H).

  Returns:
    (out_TNH in q's dtype, lse_TN float32); padding tokens and tokens that see no key give
    out 0 and lse -inf.
  """
  T, N, H = q_TNH.shape
  _, _, page_tokens, K, _ = pages_P2TKH.shape
  G = N // K
  S, P = page_table_SP.shape
  C = max(1, min(chunk_pages, P))
  chunks = -(-P // C)
  seq_T, pos_T, valid_T = token_metadata(cu_q_lens_S1, kv_lens_S, num_seqs, T)
  table_SP = jnp.pad(page_table_SP.astype(jnp.int32), ((0, 0), (0, chunks * C - P)))
  table_TP = table_SP[seq_T]
  n = jnp.clip(num_seqs.reshape(()).astype(jnp.int32), 0, S)
  longest = jnp.max(jnp.where(jnp.arange(S) < n, kv_lens_S.astype(jnp.int32), 0))
  trips = jnp.minimum(-(-longest // (C * page_tokens)), chunks)
  q_TKGH = q_TNH.astype(jnp.float32).reshape(T, K, G, H)
  CL = C * page_tokens

  def chunk(c, carry):
    m_TKG, l_TKG, acc_TKGH = carry
    pids_TC = jax.lax.dynamic_slice_in_dim(table_TP, c * C, C, axis=1)
    kv_TC2LKH = pages_P2TKH[pids_TC]
    k_TLKH = kv_TC2LKH[:, :, 0].reshape(T, CL, K, H)
    v_TLKH = kv_TC2LKH[:, :, 1].reshape(T, CL, K, H)
    l_L = c * CL + jnp.arange(CL, dtype=jnp.int32)
    seen_TL = ((l_L[None] <= pos_T[:, None]) & (jnp.repeat(pids_TC, page_tokens, axis=1) != 0)
               & valid_T[:, None])
    # Garbage (NaN) in unseen slots: its scores are selected to -inf and its V rows to 0, so it
    # never reaches a product (p = 0 would not cancel a NaN V).
    v_TLKH = jnp.where(seen_TL[..., None, None], v_TLKH.astype(jnp.float32), 0.0)
    s_TKGL = jnp.einsum("tkgh,tlkh->tkgl", q_TKGH, k_TLKH.astype(jnp.float32),
                        precision="highest") * sm_scale
    s_TKGL = mask_scores(s_TKGL, seen_TL[:, None, None, :])
    m_new_TKG = jnp.maximum(m_TKG, jnp.max(s_TKGL, axis=-1))
    # Only "no key yet" (-inf) is guarded: a NaN max stays NaN and poisons the row. Unseen
    # scores give exp(-inf - m_safe) = 0 exactly, as does alpha while m was -inf.
    m_safe_TKG = jnp.where(m_new_TKG == NEG_INF, 0.0, m_new_TKG)
    p_TKGL = jnp.exp(s_TKGL - m_safe_TKG[..., None])
    alpha_TKG = jnp.exp(m_TKG - m_safe_TKG)
    l_TKG = alpha_TKG * l_TKG + jnp.sum(p_TKGL, axis=-1)
    acc_TKGH = alpha_TKG[..., None] * acc_TKGH + jnp.einsum(
        "tkgl,tlkh->tkgh", p_TKGL, v_TLKH, precision="highest")
    return m_new_TKG, l_TKG, acc_TKGH

  init = (jnp.full((T, K, G), NEG_INF, jnp.float32), jnp.zeros((T, K, G), jnp.float32),
          jnp.zeros((T, K, G, H), jnp.float32))
  m_TKG, l_TKG, acc_TKGH = jax.lax.fori_loop(0, trips, chunk, init)
  out_TKGH, lse_TKG1 = finalize(m_TKG[..., None], l_TKG[..., None], acc_TKGH)
  return out_TKGH.reshape(T, N, H).astype(q_TNH.dtype), lse_TKG1.reshape(T, N)


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
