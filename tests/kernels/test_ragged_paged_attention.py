"""ragged_paged_attention: Pallas kernels (interpret) vs the jnp reference vs bundled oracles.

Every batch reads a pool larger than its sequences through scattered page tables, and every
page no live sequence references (page 0 included) and every slot past a sequence's kv_len is
filled with NaN: a kernel or reference that reads another sequence's data fails. Second oracles
nobody here wrote: JAX's `pallas.ops.gpu.paged_attention.paged_attention_reference` (decode) and
`pallas.ops.tpu.ragged_paged_attention.ref_ragged_paged_attention` (mixed batches).
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention_reference
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from pallas_kernels.ragged_paged_attention import kernel as kernel_lib
from pallas_kernels.ragged_paged_attention import (
  merge_attention,
  page_tokens_of,
  ragged_paged_attention,
  ragged_paged_attention_reference,
  unview_pages,
  validate_inputs,
  view_pages,
)
from pallas_kernels.ragged_paged_attention import reference as reference_lib

# Tolerances, stated once: (atol, rtol) by dtype. Inputs are drawn in f32 and rounded to the
# dtype; reference and kernels see the same rounded values. bf16: the kernel feeds bf16
# probabilities to the PV matmul and rounds the output to bf16.
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (2e-2, 2e-2)}


def make_batch(seed, q_lens, kv_lens, *, kv_heads=2, group=2, head_dim=64, page_tokens=16,
               pages_per_seq=4, num_tokens=None, max_seqs=None, spare_pages=3,
               dtype=jnp.float32):
  """A ragged batch over a NaN-poisoned pool; returns (args tuple, info dict).

  q_lens / kv_lens: per live sequence; pages are scattered at random over a pool with
  `spare_pages` unused pages (plus the null page 0), all NaN, as are slots past kv_len.
  num_tokens / max_seqs: padded sizes (defaults: a few padding tokens, one padding sequence).
  """
  rng = np.random.default_rng(seed)
  n = len(q_lens)
  S = max_seqs or n + 1
  T = num_tokens or sum(q_lens) + 3
  K, H, Tp = kv_heads, head_dim, page_tokens
  N = K * group
  used = [-(-kv // Tp) for kv in kv_lens]
  num_pages = 1 + sum(used) + spare_pages
  ids = rng.permutation(np.arange(1, num_pages))
  table = np.zeros((S, pages_per_seq), np.int32)
  pages = np.full((num_pages, 2, Tp, K, H), np.nan, np.float32)
  at = 0
  for s in range(n):
    table[s, :used[s]] = ids[at:at + used[s]]
    at += used[s]
    for p in range(used[s]):
      live = min(Tp, kv_lens[s] - p * Tp)
      pages[table[s, p], :, :live] = rng.standard_normal((2, live, K, H))
  # Padding sequences point at garbage pages: they must be ignored.
  table[n:] = rng.integers(0, num_pages, size=table[n:].shape)
  cu = np.zeros(S + 1, np.int32)
  cu[1:n + 1] = np.cumsum(q_lens)
  cu[n + 1:] = 10 ** 6  # garbage past num_seqs
  kv = np.zeros(S, np.int32)
  kv[:n] = kv_lens
  kv[n:] = 7
  q = rng.standard_normal((T, N, H)).astype(np.float32)
  q[cu[n]:] = np.nan  # padding query rows are garbage too
  pool = pages.reshape(num_pages, -1)
  args = (jnp.asarray(q, dtype), jnp.asarray(pool, dtype), jnp.asarray(table), jnp.asarray(cu),
          jnp.asarray(kv), jnp.asarray([n], jnp.int32))
  return args, dict(kv_heads=K, num_live_tokens=int(cu[n]), num_seqs=n)


def assert_attention_close(actual, expected, dtype, num_live_tokens):
  (out, lse), (out_ref, lse_ref) = actual, expected
  atol, rtol = TOL[dtype]
  out = np.asarray(jnp.asarray(out, jnp.float32))
  out_ref = np.asarray(jnp.asarray(out_ref, jnp.float32))
  lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
  assert np.isfinite(out).all(), "NaN/inf in out"
  assert not np.isnan(lse).any(), "NaN in lse"
  np.testing.assert_allclose(out, out_ref, atol=atol, rtol=rtol)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
  finite = np.isfinite(lse_ref)
  np.testing.assert_allclose(lse[finite], lse_ref[finite], atol=atol, rtol=rtol)
  # Padding tokens: out 0, lse -inf.
  assert (out[num_live_tokens:] == 0).all()
  assert np.isneginf(lse[num_live_tokens:]).all()


GPU_BLOCKS = kernel_lib.BlockSizes(16, 1)


@functools.partial(jax.jit, static_argnames=("kv_heads", "block_sizes", "sm_scale"))
def run_gpu_kernel(args, kv_heads, block_sizes=GPU_BLOCKS, sm_scale=None):
  """The GPU (Triton) kernel in interpret mode, wrapped like `ragged_paged_attention` does."""
  q_TNH, pool_PE, table, cu, kv_lens, num_seqs = args
  H = q_TNH.shape[-1]
  G = q_TNH.shape[1] // kv_heads
  Tp = page_tokens_of(pool_PE.shape[1], kv_heads, H)
  items = reference_lib.work_items(cu, kv_lens, num_seqs, num_tokens=q_TNH.shape[0],
                                   q_block=block_sizes.q_block, page_tokens=Tp,
                                   pages_per_seq=table.shape[1])
  q_WKRH = kernel_lib.pack_queries(q_TNH, items, kv_heads, block_sizes.q_block)
  out, lse = kernel_lib.attention_gpu(q_WKRH, pool_PE, table, items, kv_lens, page_tokens=Tp,
                                      group=G, sm_scale=sm_scale or H ** -0.5, interpret=True)
  return kernel_lib.unpack_outputs(out, lse, items, block_sizes.q_block)


# One jitted entry point for the tests: the compiled executable is reused across calls with the
# same shapes and static arguments (eager calls would recompile the interpreted kernel).
attn = jax.jit(ragged_paged_attention,
               static_argnames=("kv_heads", "head_dim", "sm_scale", "impl", "block_sizes"))


# Mixed prefill / decode batches: (q_lens, kv_lens) per live sequence, with lengths from 1 token
# to several pages, prefill chunks on top of earlier context, decodes at page boundaries.
MIXED = ([9, 1, 1, 20], [40, 16, 33, 20])
CASES = [
    # (kv_heads, group, head_dim, page_tokens, dtype, block_sizes)
    (2, 1, 64, 16, jnp.float32, (8, 2)),
    (2, 2, 128, 16, jnp.bfloat16, (8, 2)),
    (1, 4, 64, 8, jnp.bfloat16, (4, 3)),
    (1, 8, 128, 16, jnp.float32, (16, 4)),
]


@pytest.mark.parametrize("kv_heads,group,head_dim,page_tokens,dtype,block_sizes", CASES)
def test_interpret_matches_reference(kv_heads, group, head_dim, page_tokens, dtype, block_sizes):
  q_lens, kv_lens = MIXED
  args, info = make_batch(0, q_lens, kv_lens, kv_heads=kv_heads, group=group,
                          head_dim=head_dim, page_tokens=page_tokens,
                          pages_per_seq=-(-max(kv_lens) // page_tokens) + 1, dtype=dtype)
  validate_inputs(*args, kv_heads=kv_heads)
  ref = attn(*args, kv_heads=kv_heads, impl="reference")
  got = attn(*args, kv_heads=kv_heads, impl="interpret",
                               block_sizes=block_sizes)
  assert_attention_close(got, ref, dtype, info["num_live_tokens"])
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32


@pytest.mark.parametrize("group,dtype", [(2, jnp.float32), (8, jnp.bfloat16)])
def test_gpu_kernel_interpret_matches_reference(group, dtype):
  q_lens, kv_lens = MIXED
  args, info = make_batch(1, q_lens, kv_lens, kv_heads=2, group=group, head_dim=64, dtype=dtype,
                          pages_per_seq=3)
  ref = attn(*args, kv_heads=2, impl="reference")
  assert_attention_close(run_gpu_kernel(args, 2), ref, dtype, info["num_live_tokens"])


FIXED_T, FIXED_S, FIXED_PPS, FIXED_TP = 24, 4, 3, 8


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(data=st.data())
def test_random_ragged_batches(data):
  """Random lengths at fixed padded shapes (one compile): interpret == reference."""
  n = data.draw(st.integers(1, FIXED_S), label="num_seqs")
  q_lens, kv_lens = [], []
  budget = FIXED_T
  for _ in range(n):
    kv = data.draw(st.integers(1, FIXED_PPS * FIXED_TP))
    q = data.draw(st.integers(0 if budget == 0 else 1, max(0, min(kv, budget))))
    q_lens.append(q)
    kv_lens.append(kv)
    budget -= q
  seed = data.draw(st.integers(0, 2 ** 16))
  args, info = make_batch(seed, q_lens, kv_lens, kv_heads=2, group=2, head_dim=64,
                          page_tokens=FIXED_TP, pages_per_seq=FIXED_PPS, num_tokens=FIXED_T,
                          max_seqs=FIXED_S, spare_pages=24 - sum(-(-k // FIXED_TP)
                                                                for k in kv_lens))
  validate_inputs(*args, kv_heads=2)
  expected = dense_oracle(args, 2, 64 ** -0.5)
  ref = attn(*args, kv_heads=2, impl="reference")
  got = attn(*args, kv_heads=2, impl="interpret", block_sizes=(4, 2))
  assert_attention_close(ref, expected, jnp.float32, info["num_live_tokens"])
  assert_attention_close(got, ref, jnp.float32, info["num_live_tokens"])


def oracle_inputs(args):
  """A batch's arrays as numpy (q and the pool in float32)."""
  return [np.asarray(jnp.asarray(a, jnp.float32)) if i < 2 else np.asarray(a)
          for i, a in enumerate(args)]


def live_keys(table, cu, kv_lens, num_seqs, page_tokens):
  """The oracles' causal walk: (query token t, [(page, offset) of every key t sees in a live
  page]) for each live query token that sees at least one key."""
  for s in range(int(num_seqs[0])):
    q_len = cu[s + 1] - cu[s]
    for i in range(q_len):
      t, pos = cu[s] + i, kv_lens[s] - q_len + i
      keys = [(table[s, j // page_tokens], j % page_tokens) for j in range(pos + 1)
              if table[s, j // page_tokens] != 0]
      if keys:
        yield t, keys


def dense_oracle(args, kv_heads, sm_scale):
  """Float64 numpy loop over sequences and tokens: causal attention over the live pages."""
  q, pool, table, cu, kv_lens, num_seqs = oracle_inputs(args)
  T, N, H = q.shape
  pages = pool.reshape(pool.shape[0], 2, -1, kv_heads, H).astype(np.float64)
  G = N // kv_heads
  out = np.zeros((T, N, H))
  lse = np.full((T, N), -np.inf)
  for t, keys in live_keys(table, cu, kv_lens, num_seqs, pages.shape[2]):
    k = np.stack([pages[page, 0, j] for page, j in keys])  # [L, K, H]
    v = np.stack([pages[page, 1, j] for page, j in keys])
    for n in range(N):
      sc = k[:, n // G] @ q[t, n] * sm_scale
      m = sc.max()
      p = np.exp(sc - m)
      out[t, n] = p @ v[:, n // G] / p.sum()
      lse[t, n] = m + np.log(p.sum())
  return out, lse


def _skip_page(args, seq, page):
  """The batch with one page of a sequence skipped (entry 0): its keys must not count."""
  table = np.asarray(args[2]).copy()
  table[seq, page] = 0
  return (*args[:2], jnp.asarray(table), *args[3:])


def test_float64_loop_oracle():
  args, info = make_batch(2, [5, 1, 3], [21, 9, 3], kv_heads=2, group=2, head_dim=64,
                          page_tokens=8, pages_per_seq=3)
  args = _skip_page(args, 0, 1)
  expected = dense_oracle(args, 2, 0.125)
  for impl in ("reference", "interpret"):
    got = attn(*args, kv_heads=2, impl=impl, block_sizes=(4, 2))
    assert_attention_close(got, expected, jnp.float32, info["num_live_tokens"])


@pytest.mark.parametrize("chunk_pages", [1, 3, 8])
def test_reference_chunks_over_a_wide_table_match_the_float64_oracle(chunk_pages):
  """Online softmax over page chunks; a table far wider than the longest sequence (the
  engine's max_context) and a skipped page in the middle; NaN everywhere else."""
  args, info = make_batch(4, [6, 1, 2], [37, 11, 2], kv_heads=2, group=2, head_dim=64,
                          page_tokens=4, pages_per_seq=24)
  args = _skip_page(args, 0, 3)
  expected = dense_oracle(args, 2, 0.125)
  q, pool, *rest = args
  got = ragged_paged_attention_reference(q, pool.reshape(pool.shape[0], 2, 4, 2, 64), *rest,
                                         sm_scale=0.125, chunk_pages=chunk_pages)
  assert_attention_close(got, expected, jnp.float32, info["num_live_tokens"])


@pytest.mark.parametrize("chunk_pages", [1, 3])
def test_reference_over_a_spread_sequence_matches_the_float64_oracle(chunk_pages):
  """A sequence spread over two devices: each device's table holds one contiguous run of its
  pages (the other's entries 0, the head's on one, the tail's on the other), so the prefix
  loop starts and stops inside the table; each partial equals the oracle over its pages, and
  the two merge into the full attention."""
  args, info = make_batch(6, [6, 1, 2], [45, 30, 2], kv_heads=2, group=2, head_dim=64,
                          page_tokens=4, pages_per_seq=16)
  table = np.asarray(args[2])
  head, tail = table.copy(), table.copy()
  head[0, 5:], head[1, 4:] = 0, 0
  tail[0, :5], tail[1, :4], tail[2] = 0, 0, 0
  q, pool, *rest = args
  pages = pool.reshape(pool.shape[0], 2, 4, 2, 64)
  parts = []
  for part in (head, tail):
    part_args = (q, pool, jnp.asarray(part), *rest[1:])
    got = ragged_paged_attention_reference(q, pages, jnp.asarray(part), *rest[1:],
                                           sm_scale=0.125, chunk_pages=chunk_pages)
    assert_attention_close(got, dense_oracle(part_args, 2, 0.125), jnp.float32,
                           info["num_live_tokens"])
    parts.append(got)
  merged = merge_attention([p[0] for p in parts], [p[1] for p in parts])
  assert_attention_close(merged, dense_oracle(args, 2, 0.125), jnp.float32,
                         info["num_live_tokens"])


def test_prefix_chunk_range_spans_the_needed_pages_only():
  """Hand-computed: pages of 4 tokens, chunks of 2 pages. Item 0's prefix (10 keys) reaches
  pages 0-2, of which its table holds page 2 (its page 5 lies past the prefix); item 1's (30
  keys) reaches pages 0-7, its table holds 4-6. Needed: pages 2 and 4-6, so chunks 1-3. A
  padding item's entries (prefix 0) never count."""
  table = np.zeros((3, 10), np.int32)
  table[0, 2] = 7
  table[0, 5] = 8  # past item 0's prefix (10 keys: pages 0-2)
  table[1, 4:7] = [3, 9, 5]
  table[2, 0] = 4  # a padding item's garbage
  prefix = np.array([10, 30, 0], np.int32)
  first, stop = reference_lib.prefix_chunk_range(jnp.asarray(table), jnp.asarray(prefix),
                                                 page_tokens=4, chunk_pages=2)
  assert (int(first), int(stop)) == (1, 4)  # pages 2..6: chunks 1, 2, 3
  first, stop = reference_lib.prefix_chunk_range(jnp.asarray(table), jnp.asarray([0, 0, 0]),
                                                 page_tokens=4, chunk_pages=2)
  assert int(first) == int(stop)  # no prefix: no chunk


def test_default_q_block():
  assert reference_lib.default_q_block(32, 32) == 1  # decode: an item per token
  assert reference_lib.default_q_block(63, 32) == 2
  assert reference_lib.default_q_block(1024, 32) == 8  # 32-token prefill chunks: 8 at most
  assert reference_lib.default_q_block(5, 1) == 8


@pytest.mark.parametrize("q_block", [1, 3, 8])
def test_reference_work_items_match_the_float64_oracle(q_block):
  """Items of 1, 3 and 8 tokens: prefill chunks cut into several items (the last one short),
  prefixes over a skipped page, decodes; with one page per prefix chunk the carry is used."""
  args, info = make_batch(5, *MIXED, kv_heads=2, group=2, head_dim=64, page_tokens=8,
                          pages_per_seq=6)
  args = _skip_page(args, 0, 2)
  expected = dense_oracle(args, 2, 0.125)
  q, pool, *rest = args
  for chunk_pages in (1, 8):
    got = ragged_paged_attention_reference(q, pool.reshape(pool.shape[0], 2, 8, 2, 64), *rest,
                                           sm_scale=0.125, chunk_pages=chunk_pages,
                                           q_block=q_block)
    assert_attention_close(got, expected, jnp.float32, info["num_live_tokens"])


def test_split_and_merge_equals_full():
  """Partials over two disjoint page sets (the other set zeroed) merge into the full result."""
  args, info = make_batch(3, [6, 1, 12], [30, 17, 12], kv_heads=2, group=4, head_dim=64,
                          page_tokens=8, pages_per_seq=4)
  table = np.asarray(args[2])
  rng = np.random.default_rng(0)
  mine = rng.random(table.shape) < 0.5
  halves = [np.where(mine, table, 0), np.where(mine, 0, table)]
  for impl in ("reference", "interpret"):
    full = attn(*args, kv_heads=2, impl=impl, block_sizes=(4, 2))
    parts = [attn(args[0], args[1], jnp.asarray(h), *args[3:], kv_heads=2,
                                    impl=impl, block_sizes=(4, 2)) for h in halves]
    merged = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert_attention_close(merged, full, jnp.float32, info["num_live_tokens"])
  # Merging with an empty partial (lse -inf, out NaN) changes nothing.
  out, lse = full
  nan_out = jnp.full_like(out, jnp.nan)
  empty_lse = jnp.full_like(lse, -jnp.inf)
  merged = merge_attention(jnp.stack([out, nan_out]), jnp.stack([lse, empty_lse]))
  assert_attention_close(merged, full, jnp.float32, info["num_live_tokens"])


def _corrupt(args, kv_heads, seq, pos, kind, value, kv_head=1, dim=5):
  """The batch with one live entry of `seq` at position `pos` set; kind "K" or "V"."""
  q, pool, table = args[:3]
  pages = np.array(view_pages(pool, kv_heads=kv_heads, head_dim=q.shape[-1]))
  Tp = pages.shape[2]
  pages[np.asarray(table)[seq, pos // Tp], "KV".index(kind), pos % Tp, kv_head, dim] = value
  return (q, jnp.asarray(unview_pages(pages)), *args[2:])


reference_chunks_of_1 = jax.jit(
    functools.partial(ragged_paged_attention_reference, chunk_pages=1),
    static_argnames="sm_scale")


def _run(impl, args, kv_heads):
  if impl == "gpu_interpret":
    return run_gpu_kernel(args, kv_heads)
  if impl == "reference_chunks_of_1":  # a page per chunk: the online softmax's carry is used
    q, pool, *rest = args
    H = q.shape[-1]
    return reference_chunks_of_1(q, view_pages(pool, kv_heads=kv_heads, head_dim=H), *rest,
                                 sm_scale=H ** -0.5)
  return attn(*args, kv_heads=kv_heads, impl=impl, block_sizes=(4, 2))


def _assert_only_poisoned(got, clean, bad_out, bad_lse, value):
  """out / lse are non-finite where marked (NaN for a NaN value) and bit-equal elsewhere."""
  out, lse = np.asarray(got[0]), np.asarray(got[1])
  clean_out, clean_lse = np.asarray(clean[0]), np.asarray(clean[1])
  assert bad_out.any()
  assert (np.isnan(out[bad_out]) if np.isnan(value) else ~np.isfinite(out[bad_out])).all()
  assert np.isnan(lse[bad_lse]).all()
  np.testing.assert_array_equal(out[~bad_out], clean_out[~bad_out])
  np.testing.assert_array_equal(lse[~bad_lse], clean_lse[~bad_lse])


# (q_lens, kv_lens): sequence 1's 4 new tokens sit at positions 19..22 over 19 cached ones.
LIVE_NAN_BATCH = ([1, 4, 1], [40, 23, 17])


@pytest.mark.parametrize("impl", ["reference", "reference_chunks_of_1", "interpret",
                                  "gpu_interpret"])
# (seq, pos): a key in sequence 1's cached prefix (page 0, seen by all its new tokens) and
# sequence 0's own new decode token (its last page).
@pytest.mark.parametrize("seq,pos", [(1, 5), (0, 39)])
@pytest.mark.parametrize("kind,value", [("K", np.nan), ("K", -np.inf), ("V", np.nan),
                                        ("V", np.inf)])
def test_corrupt_live_entry_surfaces_and_spares_other_sequences(impl, seq, pos, kind, value):
  """A NaN / inf in a live K or V entry is not taken for "no key": every token that sees it gets
  a non-finite out in the heads reading that kv head (the whole row and a NaN lse for K, which
  corrupts the scores; that head dim for V, lse untouched); every other value is bit-equal to
  the clean run."""
  args, _ = make_batch(11, *LIVE_NAN_BATCH, kv_heads=2, group=2, head_dim=64, page_tokens=16,
                       pages_per_seq=3)
  clean = _run(impl, args, 2)
  got = _run(impl, _corrupt(args, 2, seq, pos, kind, value, kv_head=1, dim=5), 2)
  cu = np.asarray(args[3])
  bad_lse = np.zeros(got[1].shape, bool)
  bad_lse[cu[seq]:cu[seq + 1], 2:4] = True  # kv head 1 = query heads 2, 3
  bad_out = np.repeat(bad_lse[..., None], 64, axis=-1)
  if kind == "V":
    bad_out[..., :5] = bad_out[..., 6:] = False
    bad_lse[:] = False
  _assert_only_poisoned(got, clean, bad_out, bad_lse, value)


@pytest.mark.parametrize("q_block", [None, 1, 4])
@pytest.mark.parametrize("kind,value", [("K", np.nan), ("V", np.nan), ("V", np.inf)])
def test_reference_spares_tokens_before_a_corrupt_new_entry(q_block, kind, value):
  """A corrupt K/V at a prefill chunk's own position 21 (its tokens sit at 19..22): only the
  tokens at 21 and 22 see it; the reference keeps the earlier ones of the same work item exact
  (bit-equal), which the kernels do not promise for V."""
  args, _ = make_batch(13, *LIVE_NAN_BATCH, kv_heads=2, group=2, head_dim=64, page_tokens=16,
                       pages_per_seq=3)

  def run(batch):
    q, pool, *rest = batch
    return ragged_paged_attention_reference(q, view_pages(pool, kv_heads=2, head_dim=64), *rest,
                                            sm_scale=0.125, q_block=q_block)

  clean = run(args)
  got = run(_corrupt(args, 2, 1, 21, kind, value, kv_head=1, dim=5))
  cu = np.asarray(args[3])
  bad_lse = np.zeros(got[1].shape, bool)
  bad_lse[cu[1] + 2:cu[2], 2:4] = True  # the tokens at positions 21 and 22, kv head 1
  bad_out = np.repeat(bad_lse[..., None], 64, axis=-1)
  if kind == "V":
    bad_out[..., :5] = bad_out[..., 6:] = False
    bad_lse[:] = False
  _assert_only_poisoned(got, clean, bad_out, bad_lse, value)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_merge_surfaces_a_nan_partial_and_keeps_empty_partials_exact(impl):
  """Pages over two devices: a NaN key on device 0 poisons its sequence's merged result only;
  a sequence with no page on device 1 (lse -inf there) merges to its device-0 partial exactly."""
  args, _ = make_batch(12, *LIVE_NAN_BATCH, kv_heads=2, group=2, head_dim=64, page_tokens=16,
                       pages_per_seq=3)
  table = np.asarray(args[2])
  on_dev0 = np.zeros(table.shape, bool)
  on_dev0[0, 1] = on_dev0[1, 0] = True
  on_dev0[2] = True  # sequence 2: all its pages on device 0, none on device 1
  halves = [jnp.asarray(np.where(on_dev0, table, 0)), jnp.asarray(np.where(on_dev0, 0, table))]

  def merged(batch):
    parts = [_run(impl, (*batch[:2], h, *batch[3:]), 2) for h in halves]
    return merge_attention([p[0] for p in parts], [p[1] for p in parts]), parts

  clean, clean_parts = merged(args)
  got, _ = merged(_corrupt(args, 2, 1, 5, "K", np.nan, kv_head=1))  # page 0 of seq 1: device 0
  cu = np.asarray(args[3])
  bad_lse = np.zeros(got[1].shape, bool)
  bad_lse[cu[1]:cu[2], 2:4] = True
  _assert_only_poisoned(got, clean, np.repeat(bad_lse[..., None], 64, axis=-1), bad_lse, np.nan)
  seq2 = slice(cu[2], cu[3])
  assert np.isneginf(np.asarray(clean_parts[1][1])[seq2]).all()
  np.testing.assert_array_equal(np.asarray(clean[0])[seq2], np.asarray(clean_parts[0][0])[seq2])
  np.testing.assert_array_equal(np.asarray(clean[1])[seq2], np.asarray(clean_parts[0][1])[seq2])


def test_merge_attention_against_logaddexp():
  """Hand oracle (float64): weights exp(lse_i - logaddexp(lse)); an empty partial (lse -inf,
  out NaN) weighs nothing; a NaN out surfaces even when its weight underflows to 0."""
  rng = np.random.default_rng(13)
  outs = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
  lses = rng.standard_normal((2, 3, 2)).astype(np.float32)
  lses[1, 0] = -np.inf  # token 0: partial 1 saw no key
  outs[1, 0] = np.nan
  lses[1, 1, 0] -= 1000.0  # token 1 head 0: partial 1's weight underflows
  lses[:, 2, 1] = -np.inf  # token 2 head 1: no partial saw a key
  lse64 = np.logaddexp(*lses.astype(np.float64))
  with np.errstate(invalid="ignore"):
    w = np.exp(lses - lse64)
  expected = np.nansum(w[..., None] * np.where(np.isneginf(lses)[..., None], 0, outs), axis=0)
  out, lse = (np.asarray(a) for a in merge_attention(jnp.asarray(outs), jnp.asarray(lses)))
  np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(lse, lse64, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(out[0], outs[0, 0])  # an empty partial changes nothing
  np.testing.assert_array_equal(lse[0], lses[0, 0])
  assert (out[2, 1] == 0).all() and np.isneginf(lse[2, 1])
  outs[1, 1, 0, 2] = np.nan
  out, lse = (np.asarray(a) for a in merge_attention(jnp.asarray(outs), jnp.asarray(lses)))
  assert np.isnan(out[1, 0, 2]) and np.isfinite(lse[1, 0])
  nan_at = np.zeros(out.shape, bool)
  nan_at[1, 0, 2] = True
  np.testing.assert_allclose(out[~nan_at], expected[~nan_at], atol=1e-6, rtol=1e-6)


def test_sequence_without_pages_gives_zero_and_neg_inf():
  args, _ = make_batch(4, [3, 1], [10, 5], kv_heads=1, group=2, head_dim=64, page_tokens=8,
                          pages_per_seq=2)
  table = np.asarray(args[2]).copy()
  table[1] = 0  # all of sequence 1's pages are remote
  args = (*args[:2], jnp.asarray(table), *args[3:])
  for impl in ("reference", "interpret"):
    out, lse = attn(*args, kv_heads=1, impl=impl, block_sizes=(4, 2))
    assert (np.asarray(out)[3] == 0).all() and np.isneginf(np.asarray(lse)[3]).all()
    assert np.isfinite(np.asarray(lse)[:3]).all()


def test_jax_gpu_paged_attention_reference_decode():
  """Decode batch vs JAX's bundled GPU paged-attention reference (sm_scale 1, no causal)."""
  kv_lens = [17, 5, 32, 1]
  args, _ = make_batch(5, [1] * 4, kv_lens, kv_heads=2, group=4, head_dim=64, page_tokens=8,
                          pages_per_seq=4, num_tokens=4, max_seqs=4)
  q, pool, table = args[:3]
  pages = np.asarray(view_pages(pool, kv_heads=2, head_dim=64))
  L = 4 * 8
  gathered = pages[np.asarray(table)]  # [B, pps, 2, Tp, K, H]
  k = np.nan_to_num(gathered[:, :, 0].reshape(4, L, 2, 64))  # oracle masks by length only
  v = np.nan_to_num(gathered[:, :, 1].reshape(4, L, 2, 64))
  expected = paged_attention_reference(q, jnp.asarray(k), jnp.asarray(v),
                                       jnp.asarray(kv_lens, jnp.int32))
  for impl in ("reference", "interpret"):
    out, _ = attn(*args, kv_heads=2, sm_scale=1.0, impl=impl,
                                    block_sizes=(1, 2))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), *TOL[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jax_tpu_ref_ragged_paged_attention(dtype):
  """Mixed batch vs JAX's bundled `ref_ragged_paged_attention` (interleaved K/V heads)."""
  args, info = make_batch(6, [4, 1, 6], [20, 16, 6], kv_heads=2, group=2, head_dim=128,
                          pages_per_seq=3, dtype=dtype)
  q, pool, table, cu, kv, n = args
  pages = view_pages(pool, kv_heads=2, head_dim=128)  # [P, 2, Tp, K, H]
  # Theirs: [P, Tp, 2K, H], head 2h = K of kv head h, 2h + 1 = V.
  combined = jnp.stack([pages[:, 0], pages[:, 1]], axis=3).reshape(pages.shape[0], 16, 4, 128)
  live = info["num_live_tokens"]
  expected = ref_ragged_paged_attention(q, combined, kv, table, cu, n, sm_scale=128 ** -0.5)
  out, _ = attn(*args, kv_heads=2, impl="interpret", block_sizes=(8, 2))
  atol, rtol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out[:live], np.float32),
                             np.asarray(expected, np.float32), atol=atol, rtol=rtol)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype,group,head_dim", [(jnp.bfloat16, 4, 128), (jnp.float32, 1, 64)])
def test_lowers(platform, dtype, group, head_dim):
  """The `pallas` impl lowers for the accelerator (TPU: Mosaic kernel; cuda: Triton kernel)."""
  args, _ = make_batch(7, [5, 1], [20, 9], kv_heads=2, group=group, head_dim=head_dim,
                       page_tokens=16, pages_per_seq=2, dtype=dtype)
  f = jax.jit(lambda *a: ragged_paged_attention(*a, kv_heads=2, impl="pallas"))
  text = f.trace(*args).lower(lowering_platforms=(platform,)).as_text()
  kind = "tpu" if platform == "tpu" else "gpu"
  assert f"ragged_paged_attention_{kind}_R" in text


def test_block_size_table_and_override():
  assert default_bs("tpu", 128, 16, 4) == kernel_lib.BLOCK_SIZE_TABLE[("tpu", 128, 16)]
  assert default_bs("gpu", 100, 5, 1).q_block >= 16  # Triton dot needs R >= 16
  assert default_bs("interpret", 64, 8, 2) == kernel_lib.BlockSizes(8, 2)
  args, _ = make_batch(8, [2], [3], kv_heads=1, group=1, head_dim=64, page_tokens=8,
                       pages_per_seq=1)
  with pytest.raises(ValueError, match="block_sizes must be positive"):
    attn(*args, kv_heads=1, impl="interpret", block_sizes=(0, 1))


def default_bs(*a):
  return kernel_lib.default_block_sizes(*a)


def test_view_pages_is_a_reshape_and_checks_page_elems():
  pool = jnp.arange(3 * 2 * 4 * 2 * 8, dtype=jnp.float32).reshape(3, -1)
  pages = view_pages(pool, kv_heads=2, head_dim=8)
  assert pages.shape == (3, 2, 4, 2, 8)
  np.testing.assert_array_equal(unview_pages(pages), pool)
  with pytest.raises(ValueError, match="page_elems=128 is not a positive multiple"):
    view_pages(pool, kv_heads=3, head_dim=8)


def test_trace_time_errors():
  args, _ = make_batch(9, [2, 1], [5, 3], kv_heads=2, group=2, head_dim=64, page_tokens=8,
                       pages_per_seq=1)
  q, pool, table, cu, kv, n = args
  call = lambda *a, **kw: ragged_paged_attention(*a, **{"kv_heads": 2, **kw})  # noqa: E731
  with pytest.raises(ValueError, match="not a multiple of kv_heads=3"):
    call(*args, kv_heads=3)
  with pytest.raises(ValueError, match="pool_PE dtype bfloat16 must equal"):
    call(q, pool.astype(jnp.bfloat16), *args[2:])
  with pytest.raises(ValueError, match="cu_q_lens_S1 must have shape"):
    call(q, pool, table, cu[:-1], kv, n)
  with pytest.raises(ValueError, match="kv_lens_S must be int32"):
    call(q, pool, table, cu, kv.astype(jnp.float32), n)
  with pytest.raises(ValueError, match="num_seqs must have shape"):
    call(q, pool, table, cu, kv, n[0])
  with pytest.raises(ValueError, match="head_dim=32 does not match"):
    call(*args, head_dim=32)
  with pytest.raises(ValueError, match="impl must be one of"):
    call(*args, impl="cuda")
  with pytest.raises(ValueError, match="page_elems"):
    call(q[:, :, :48], pool, *args[2:])
  with pytest.raises(ValueError, match="power of two >= 16"):
    run_gpu_kernel(args, 2)  # page_tokens = 8 is too small for the Triton dot


def test_validate_inputs_errors():
  args, _ = make_batch(10, [2, 1], [5, 3], kv_heads=2, group=2, head_dim=64, page_tokens=8,
                       pages_per_seq=1)
  q, pool, table, cu, kv, n = (np.asarray(a) for a in args)
  validate_inputs(q, pool, table, cu, kv, n, kv_heads=2)

  def bad(match, **repl):
    a = dict(q_TNH=q, pool_PE=pool, page_table_SP=table, cu_q_lens_S1=cu, kv_lens_S=kv,
             num_seqs=n)
    a.update(repl)
    with pytest.raises(ValueError, match=match):
      validate_inputs(*a.values(), kv_heads=2)

  t2 = table.copy()
  t2[1, 0] = pool.shape[0]
  bad(r"page_table_SP\[1, 0\]=\d+ is outside", page_table_SP=t2)
  t2[1, 0] = -1
  bad(r"page_table_SP\[1, 0\]=-1", page_table_SP=t2)
  bad(r"kv_lens_S\[0\]=9 must be in \[0, pages_per_seq \* page_tokens = 1 \* 8 = 8\]",
      kv_lens_S=np.array([9, 3, 0], np.int32))
  bad(r"sequence 1 has q_len=1 .* > kv_lens_S\[1\]=0",
      kv_lens_S=np.array([5, 0, 0], np.int32))
  bad(r"non-decreasing: cu_q_lens_S1\[2\]=1 < cu_q_lens_S1\[1\]=2",
      cu_q_lens_S1=np.array([0, 2, 1, 0], np.int32))
  bad(r"cu_q_lens_S1\[num_seqs=2\]=9 exceeds the 6 query tokens",
      cu_q_lens_S1=np.array([0, 2, 9, 0], np.int32), kv_lens_S=np.array([5, 7, 0], np.int32))
  bad(r"num_seqs=4 must be in \[0, max_seqs=3\]", num_seqs=np.array([4], np.int32))
