"""Ragged paged attention in plain jnp: the oracle of the kernels and the CPU path.

Glossary: T query tokens (packed over sequences), N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, S sequences (max_seqs), P pages per sequence in a page table,
L = P * page_tokens key positions of a sequence. Query head n reads kv head n // G.

Vectorised over tokens: each token gathers the pages of its own sequence with index arrays
(`pages[page_table[seq]]`), never a dynamic slice of the pool, and attends causally. Tokens are
processed in blocks of `token_block` (`lax.map`), so memory is token_block * L * K * H.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


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


def _attend_one(q_NH, seq, pos, valid, pages_P2TKH, page_table_SP, sm_scale):
  """Attention of one query token over the pages of its sequence (keys at positions <= pos)."""
  _, _, page_tokens, K, H = pages_P2TKH.shape
  N = q_NH.shape[0]
  G = N // K
  pids_P = page_table_SP[seq]
  kv_P2TKH = pages_P2TKH[pids_P]
  L = pids_P.shape[0] * page_tokens
  k_LKH = kv_P2TKH[:, 0].reshape(L, K, H)
  v_LKH = kv_P2TKH[:, 1].reshape(L, K, H)
  l_L = jnp.arange(L, dtype=jnp.int32)
  seen_L = (l_L <= pos) & (jnp.repeat(pids_P, page_tokens) != 0) & valid
  # Zero what is not seen so garbage (NaN) in unowned slots never reaches a product.
  k_LKH = jnp.where(seen_L[:, None, None], k_LKH.astype(jnp.float32), 0.0)
  v_LKH = jnp.where(seen_L[:, None, None], v_LKH.astype(jnp.float32), 0.0)
  q_KGH = q_NH.astype(jnp.float32).reshape(K, G, H)
  s_KGL = jnp.einsum("kgh,lkh->kgl", q_KGH, k_LKH, precision="highest") * sm_scale
  s_KGL = jnp.where(seen_L, s_KGL, NEG_INF)
  m_KG = jnp.max(s_KGL, axis=-1)
  m_safe_KG = jnp.where(jnp.isfinite(m_KG), m_KG, 0.0)
  p_KGL = jnp.where(seen_L, jnp.exp(s_KGL - m_safe_KG[..., None]), 0.0)
  l_KG = jnp.sum(p_KGL, axis=-1)
  o_KGH = jnp.einsum("kgl,lkh->kgh", p_KGL, v_LKH, precision="highest")
  has_KG = l_KG > 0
  o_KGH = jnp.where(has_KG[..., None], o_KGH / jnp.where(has_KG, l_KG, 1.0)[..., None], 0.0)
  lse_KG = jnp.where(has_KG, m_safe_KG + jnp.log(jnp.where(has_KG, l_KG, 1.0)), NEG_INF)
  return o_KGH.reshape(N, H), lse_KG.reshape(N)


def ragged_paged_attention_reference(q_TNH: jax.Array, pages_P2TKH: jax.Array,
                                     page_table_SP: jax.Array, cu_q_lens_S1: jax.Array,
                                     kv_lens_S: jax.Array, num_seqs: jax.Array, *,
                                     sm_scale: float, token_block: int = 64):
  """Ragged paged attention, plain jnp (see `api.ragged_paged_attention` for the contract).

  Args:
    q_TNH: [T, N, H] queries.
    pages_P2TKH: [num_pages, 2, page_tokens, K, H] the viewed pool.
    page_table_SP: int32 [S, P] page ids of each sequence; 0 = skipped.
    cu_q_lens_S1: int32 [S + 1] query start offsets.
    kv_lens_S: int32 [S] context lengths including the new tokens.
    num_seqs: int32 [1] real sequences.
    sm_scale: softmax scale.
    token_block: tokens attended at once (memory: token_block * L * K * H floats).

  Returns:
    (out_TNH in q's dtype, lse_TN float32); padding tokens and tokens that see no key give
    out 0 and lse -inf.
  """
  T = q_TNH.shape[0]
  seq_T, pos_T, valid_T = token_metadata(cu_q_lens_S1, kv_lens_S, num_seqs, T)

  def one(args):
    q_NH, seq, pos, valid = args
    return _attend_one(q_NH, seq, pos, valid, pages_P2TKH, page_table_SP.astype(jnp.int32),
                       sm_scale)

  out_TNH, lse_TN = jax.lax.map(one, (q_TNH, seq_T, pos_T, valid_T),
                                batch_size=max(1, min(token_block, T)))
  return out_TNH.astype(q_TNH.dtype), lse_TN


def merge_attention(outs, lses):
  """Exact merge of attention partials computed over disjoint key sets.

  Args:
    outs: [M, T, N, H] (or a list of M arrays [T, N, H]) normalised partial outputs.
    lses: [M, T, N] (or a list) float32 log-sum-exp of each partial; -inf = saw no key (its
      out is ignored, even if NaN).

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
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w_M = jnp.exp(lses_M - m_safe)  # exp(-inf) = 0: empty partials weigh nothing
  w_sum = jnp.sum(w_M, axis=0)
  has = w_sum > 0
  w_M = w_M / jnp.where(has, w_sum, 1.0)
  parts = jnp.where((w_M > 0)[..., None], outs_M.astype(jnp.float32), 0.0)
  out = jnp.sum(w_M[..., None] * parts, axis=0)
  lse = jnp.where(has, m_safe + jnp.log(jnp.where(has, w_sum, 1.0)), NEG_INF)
  return out.astype(outs_M.dtype), lse
