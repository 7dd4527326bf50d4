"""latent_paged_attention: Pallas kernels (interpret) vs the jnp reference vs a float64 oracle,
and against the model's absorbed latent attention on a contiguous cache.

Every batch reads a pool larger than its sequences through scattered page tables, and every
page no live sequence references (page 0 included), every slot past a sequence's kv_len and
every padding query row is NaN: a kernel or reference that reads another sequence's rows fails.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.models import layers
from crosspool_jax.models.config import LATENT_FAMILIES, tiny_config
from crosspool_jax.models.model import init_params
from pallas_kernels.latent_paged_attention import (
  default_block_sizes,
  latent_paged_attention,
  latent_paged_attention_reference,
  merge_attention,
  unview_latent_pages,
  validate_inputs,
  view_latent_pages,
  write_latent_rows,
)
from pallas_kernels.latent_paged_attention import kernel as kernel_lib
from pallas_kernels.ragged_paged_attention import kernel as ragged_kernel_lib
from pallas_kernels.ragged_paged_attention import reference as ragged_reference_lib
from tests.kernels.test_ragged_paged_attention import (
    assert_attention_close,
    live_keys,
    oracle_inputs,
)

RANK, ROPE = 32, 16  # kv_lora_rank and rope width of the kernel tests: D = 48
SCALE = 0.1


def make_batch(seed, q_lens, kv_lens, *, num_heads=4, rank=RANK, rope=ROPE, page_tokens=8,
               pages_per_seq=4, num_tokens=None, max_seqs=None, spare_pages=3,
               dtype=jnp.float32):
  """A ragged batch over a NaN-poisoned latent pool; returns (args tuple, num live tokens).

  q_lens / kv_lens per live sequence (q_len 0: context only, no new token in this batch);
  pages scattered at random over a pool with `spare_pages` unused pages (plus page 0), all NaN,
  as are the slots past kv_len and the padding query rows.
  """
  rng = np.random.default_rng(seed)
  n = len(q_lens)
  S = max_seqs or n + 1
  T = num_tokens or sum(q_lens) + 3
  D, Tp = rank + rope, page_tokens
  used = [-(-kv // Tp) for kv in kv_lens]
  num_pages = 1 + sum(used) + spare_pages
  ids = rng.permutation(np.arange(1, num_pages))
  table = np.zeros((S, pages_per_seq), np.int32)
  pages = np.full((num_pages, Tp, D), np.nan, np.float32)
  at = 0
  for s in range(n):
    table[s, :used[s]] = ids[at:at + used[s]]
    at += used[s]
    for p in range(used[s]):
      live = min(Tp, kv_lens[s] - p * Tp)
      pages[table[s, p], :live] = rng.standard_normal((live, D))
  table[n:] = rng.integers(0, num_pages, size=table[n:].shape)  # padding sequences: garbage
  cu = np.zeros(S + 1, np.int32)
  cu[1:n + 1] = np.cumsum(q_lens)
  cu[n + 1:] = 10 ** 6
  kv = np.zeros(S, np.int32)
  kv[:n] = kv_lens
  kv[n:] = 7
  q = rng.standard_normal((T, num_heads, D)).astype(np.float32)
  q[cu[n]:] = np.nan
  args = (jnp.asarray(q, dtype), jnp.asarray(unview_latent_pages(pages), dtype),
          jnp.asarray(table), jnp.asarray(cu), jnp.asarray(kv), jnp.asarray([n], jnp.int32))
  return args, int(cu[n])


def dense_oracle(args, rank, sm_scale):
  """Float64 numpy loop over sequences and tokens: causal latent attention over the live
  pages (key = the whole row, value = its first `rank` columns)."""
  q, pool, table, cu, kv_lens, num_seqs = oracle_inputs(args)
  T, N, D = q.shape
  pages = pool.reshape(pool.shape[0], -1, D).astype(np.float64)
  out = np.zeros((T, N, rank))
  lse = np.full((T, N), -np.inf)
  for t, keys in live_keys(table, cu, kv_lens, num_seqs, pages.shape[1]):
    rows = np.stack([pages[page, j] for page, j in keys])  # [L, D]
    sc = q[t] @ rows.T * sm_scale  # [N, L]
    m = sc.max(axis=1, keepdims=True)
    p = np.exp(sc - m)
    out[t] = p @ rows[:, :rank] / p.sum(axis=1, keepdims=True)
    lse[t] = m[:, 0] + np.log(p.sum(axis=1))
  return out, lse


attn = jax.jit(latent_paged_attention,
               static_argnames=("kv_lora_rank", "sm_scale", "impl", "block_sizes"))


@functools.partial(jax.jit, static_argnames=("kv_lora_rank", "sm_scale", "q_block"))
def run_gpu_kernel(args, kv_lora_rank, sm_scale, q_block=4):
  """The GPU (Triton) kernel in interpret mode, wrapped like `latent_paged_attention` does."""
  q_TND, pool_PE, table, cu, kv_lens, num_seqs = args
  T, N, D = q_TND.shape
  Tp = pool_PE.shape[1] // D
  items = ragged_reference_lib.work_items(cu, kv_lens, num_seqs, num_tokens=T, q_block=q_block,
                                          page_tokens=Tp, pages_per_seq=table.shape[1])
  q_W1RD = ragged_kernel_lib.pack_queries(q_TND, items, 1, q_block)
  out, lse = kernel_lib.attention_gpu(q_W1RD, pool_PE, table, items, kv_lens,
                                      kv_lora_rank=kv_lora_rank, page_tokens=Tp, group=N,
                                      sm_scale=sm_scale, interpret=True)
  return ragged_kernel_lib.unpack_outputs(out, lse, items, q_block)


def _run(impl, args, rank=RANK, sm_scale=SCALE, block_sizes=(2, 2)):
  if impl == "gpu_interpret":
    return run_gpu_kernel(args, rank, sm_scale)
  return attn(*args, kv_lora_rank=rank, sm_scale=sm_scale, impl=impl, block_sizes=block_sizes)


# Mixed batch: a 7-token prefill chunk over 18 cached tokens (3+ pages of 8), two decodes (one
# at a page boundary), a sequence with context but no new token (q_len 0), a whole prompt.
MIXED = ([7, 1, 0, 1, 6], [25, 16, 12, 9, 6])


@pytest.mark.parametrize("num_heads,page_tokens,dtype,block_sizes", [
    (4, 8, jnp.float32, (2, 2)),
    (2, 4, jnp.bfloat16, (4, 3)),
    (8, 8, jnp.float32, (1, 1)),
])
def test_interpret_matches_reference_and_oracle(num_heads, page_tokens, dtype, block_sizes):
  args, live = make_batch(0, *MIXED, num_heads=num_heads, page_tokens=page_tokens,
                          pages_per_seq=-(-max(MIXED[1]) // page_tokens) + 1, dtype=dtype)
  validate_inputs(*args, kv_lora_rank=RANK)
  ref = _run("reference", args)
  got = _run("interpret", args, block_sizes=block_sizes)
  assert_attention_close(ref, dense_oracle(args, RANK, SCALE), dtype, live)
  assert_attention_close(got, ref, dtype, live)
  assert got[0].shape == (args[0].shape[0], num_heads, RANK)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32


FIXED_T, FIXED_S, FIXED_PPS, FIXED_TP = 16, 3, 3, 8


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(data=st.data())
def test_random_ragged_batches(data):
  """Random lengths (q_len 0 allowed) at fixed padded shapes (one compile): the reference
  equals the float64 oracle and the TPU kernel (interpret) the reference."""
  n = data.draw(st.integers(1, FIXED_S), label="num_seqs")
  q_lens, kv_lens = [], []
  budget = FIXED_T
  for _ in range(n):
    kv = data.draw(st.integers(1, FIXED_PPS * FIXED_TP))
    q = data.draw(st.integers(0, min(kv, budget)))
    q_lens.append(q)
    kv_lens.append(kv)
    budget -= q
  seed = data.draw(st.integers(0, 2 ** 16))
  args, live = make_batch(seed, q_lens, kv_lens, page_tokens=FIXED_TP, pages_per_seq=FIXED_PPS,
                          num_tokens=FIXED_T, max_seqs=FIXED_S,
                          spare_pages=FIXED_S * FIXED_PPS - sum(-(-k // FIXED_TP)
                                                                for k in kv_lens))
  validate_inputs(*args, kv_lora_rank=RANK)
  ref = _run("reference", args)
  assert_attention_close(ref, dense_oracle(args, RANK, SCALE), jnp.float32, live)
  assert_attention_close(_run("interpret", args), ref, jnp.float32, live)


def _skip_page(args, seq, page):
  table = np.asarray(args[2]).copy()
  table[seq, page] = 0
  return (*args[:2], jnp.asarray(table), *args[3:])


@pytest.mark.parametrize("impl", ["reference", "interpret", "gpu_interpret"])
def test_float64_oracle_with_a_skipped_page(impl):
  """Sequence 0's first page skipped (entry 0): its rows count for nothing."""
  args, live = make_batch(2, [5, 1, 3], [21, 9, 3], page_tokens=16, pages_per_seq=2)
  args = _skip_page(args, 0, 0)
  assert_attention_close(_run(impl, args), dense_oracle(args, RANK, SCALE), jnp.float32, live)


@pytest.mark.parametrize("chunk_pages,q_block", [(1, 1), (3, 3), (8, 8)])
def test_reference_chunks_and_items_match_the_float64_oracle(chunk_pages, q_block):
  """The reference's prefix loop (a table far wider than the longest sequence) and items of
  1, 3 and 8 tokens."""
  args, live = make_batch(4, [6, 1, 2], [37, 11, 2], page_tokens=4, pages_per_seq=16)
  args = _skip_page(args, 0, 3)
  q, pool, *rest = args
  got = latent_paged_attention_reference(q, view_latent_pages(pool, row_dim=RANK + ROPE), *rest,
                                         kv_lora_rank=RANK, sm_scale=SCALE,
                                         chunk_pages=chunk_pages, q_block=q_block)
  assert_attention_close(got, dense_oracle(args, RANK, SCALE), jnp.float32, live)


@pytest.mark.parametrize("impl", ["reference", "interpret", "gpu_interpret"])
def test_split_and_merge_equals_full(impl):
  """A context spread over two devices (each half of the page-table entries, the other half
  0): the partials merge by LSE into the whole."""
  args, live = make_batch(3, [6, 1, 12], [30, 17, 12], page_tokens=16, pages_per_seq=2)
  table = np.asarray(args[2])
  mine = np.random.default_rng(0).random(table.shape) < 0.5
  halves = [np.where(mine, table, 0), np.where(mine, 0, table)]
  full = _run(impl, args)
  parts = [_run(impl, (*args[:2], jnp.asarray(h), *args[3:])) for h in halves]
  merged = merge_attention([p[0] for p in parts], [p[1] for p in parts])
  assert_attention_close(merged, full, jnp.float32, live)
  assert_attention_close(full, dense_oracle(args, RANK, SCALE), jnp.float32, live)


@pytest.mark.parametrize("impl", ["reference", "interpret", "gpu_interpret"])
@pytest.mark.parametrize("column", [3, RANK + 2])  # in the latent part (a value) / the rope key
def test_corrupt_live_row_surfaces_and_spares_other_sequences(impl, column):
  """A NaN in a row that sequence 1's tokens see (its cached prefix) makes their out and lse
  NaN in every head (one kv head); the other sequences stay bit-equal to the clean run."""
  args, _ = make_batch(11, [1, 4, 1], [40, 23, 17], page_tokens=16, pages_per_seq=3)
  clean = _run(impl, args)
  pages = np.array(view_latent_pages(args[1], row_dim=RANK + ROPE))
  pages[np.asarray(args[2])[1, 0], 5, column] = np.nan
  got = _run(impl, (args[0], jnp.asarray(unview_latent_pages(pages)), *args[2:]))
  cu = np.asarray(args[3])
  bad = np.zeros(got[1].shape, bool)
  bad[cu[1]:cu[2]] = True
  out, lse = np.asarray(got[0]), np.asarray(got[1])
  assert np.isnan(out[bad]).all() and np.isnan(lse[bad]).all()
  np.testing.assert_array_equal(out[~bad], np.asarray(clean[0])[~bad])
  np.testing.assert_array_equal(lse[~bad], np.asarray(clean[1])[~bad])


def test_sequence_without_pages_gives_zero_and_neg_inf():
  args, _ = make_batch(4, [3, 1], [10, 5], page_tokens=8, pages_per_seq=2)
  table = np.asarray(args[2]).copy()
  table[1] = 0  # all of sequence 1's pages are remote
  args = (*args[:2], jnp.asarray(table), *args[3:])
  for impl in ("reference", "interpret"):
    out, lse = _run(impl, args)
    assert (np.asarray(out)[3] == 0).all() and np.isneginf(np.asarray(lse)[3]).all()
    assert np.isfinite(np.asarray(lse)[:3]).all()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype,num_heads,rank,rope", [(jnp.bfloat16, 16, 512, 64),
                                                       (jnp.float32, 4, 32, 16)])
def test_lowers(platform, dtype, num_heads, rank, rope):
  """The `pallas` impl lowers for the accelerator (TPU: Mosaic kernel; cuda: Triton kernel),
  at DeepSeek-V2-Lite's row (512 + 64) and a small one."""
  args, _ = make_batch(7, [5, 1], [20, 9], num_heads=num_heads, rank=rank, rope=rope,
                       page_tokens=16, pages_per_seq=2, dtype=dtype)
  f = jax.jit(lambda *a: latent_paged_attention(*a, kv_lora_rank=rank, sm_scale=SCALE,
                                                impl="pallas"))
  text = f.trace(*args).lower(lowering_platforms=(platform,)).as_text()
  kind = "tpu" if platform == "tpu" else "gpu"
  assert f"latent_paged_attention_{kind}_R" in text


def test_default_block_sizes():
  assert default_block_sizes("tpu", 128, 16) == (2, 8)  # a decode token of 128 heads per item
  assert default_block_sizes("tpu", 16, 64) == (16, 2)
  assert default_block_sizes("gpu", 4, 16) == (4, 1)  # R = 16 rows for the Triton dot
  assert default_block_sizes("gpu", 128, 16) == (1, 1)


def test_layout_and_trace_time_errors():
  pool = jnp.arange(3 * 4 * 48, dtype=jnp.float32).reshape(3, -1)
  pages = view_latent_pages(pool, row_dim=48)
  assert pages.shape == (3, 4, 48)
  np.testing.assert_array_equal(unview_latent_pages(pages), pool)
  with pytest.raises(ValueError, match="page_elems=192 is not a positive multiple"):
    view_latent_pages(pool, row_dim=40)
  args, _ = make_batch(9, [2, 1], [5, 3], page_tokens=8, pages_per_seq=1)
  q, pool, table, cu, kv, n = args
  call = functools.partial(latent_paged_attention, sm_scale=SCALE)
  with pytest.raises(ValueError, match="kv_lora_rank must be an int in"):
    call(*args, kv_lora_rank=49)
  with pytest.raises(ValueError, match="pool_PE dtype bfloat16 must equal"):
    call(q, pool.astype(jnp.bfloat16), *args[2:], kv_lora_rank=RANK)
  with pytest.raises(ValueError, match="kv_lens_S must be int32"):
    call(q, pool, table, cu, kv.astype(jnp.float32), n, kv_lora_rank=RANK)
  with pytest.raises(ValueError, match="page_elems"):
    call(q[..., :40], pool, *args[2:], kv_lora_rank=RANK)
  with pytest.raises(ValueError, match="power of two >= 16"):
    run_gpu_kernel(args, RANK, SCALE)  # page_tokens = 8 is too small for the Triton dot
  with pytest.raises(ValueError, match=r"kv_lens_S\[0\]=9 must be in"):
    validate_inputs(q, pool, table, cu, jnp.asarray([9, 3, 0], jnp.int32), n, kv_lora_rank=RANK)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_latent_rows_fills_exactly_its_slots(dtype):
  D, Tp = RANK + ROPE, 4
  pool = np.full((5, Tp * D), np.nan, np.float32)
  rows = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
  # page 2 slot 1, page 1 slot 0, dropped, page 4 slot 3, the null page (never read)
  slots = np.asarray([9, 4, -1, 19, 1], np.int32)
  got = write_latent_rows(jnp.asarray(pool, dtype), jnp.asarray(rows, dtype), jnp.asarray(slots))
  want = view_latent_pages(pool, row_dim=D).copy()
  for row, slot in zip(rows, slots, strict=True):
    if slot >= 0:
      want[slot // Tp, slot % Tp] = row
  assert got.dtype == dtype and got.shape == pool.shape
  np.testing.assert_array_equal(np.asarray(view_latent_pages(got, row_dim=D), np.float32),
                                np.asarray(jnp.asarray(want, dtype), np.float32))
  with pytest.raises(ValueError, match="rows_TD dtype bfloat16 must equal pool_PE dtype float32"):
    write_latent_rows(jnp.asarray(pool), jnp.asarray(rows, jnp.bfloat16), jnp.asarray(slots))
  with pytest.raises(ValueError, match=r"slot_mapping_T must be int32 \[T=5\]"):
    write_latent_rows(jnp.asarray(pool), jnp.asarray(rows), jnp.asarray(slots[:4]))
  with pytest.raises(ValueError, match="not a positive multiple of the latent row width 40"):
    write_latent_rows(jnp.asarray(pool), jnp.asarray(rows[:, :40]), jnp.asarray(slots))


@pytest.mark.parametrize("family", LATENT_FAMILIES)
@pytest.mark.parametrize("impl", ["reference", "interpret", "gpu_interpret"])
def test_absorbed_paged_attention_equals_the_models_latent_attention(family, impl):
  """A tiny DeepSeek layer: each sequence's latent rows written into scattered pages, the
  kernel on the absorbed queries, W_UV applied, equals `layers.attend_latent(absorbed=True)`
  on the contiguous cache. Sequence 0: a 5-token chunk over 16 cached tokens; sequence 1: a
  decode token over 8."""
  cfg = tiny_config(family, qk_rope_head_dim=16, head_dim=32 + 16)
  p = init_params(cfg, seed=5)["layers"][0]["attn"]
  lens, q_lens = [21, 9], [5, 1]
  C, Tp, D = max(lens), 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim
  rng = np.random.default_rng(1)
  x_BCD = jnp.asarray(rng.standard_normal((2, C, cfg.d_model)), jnp.float32)
  positions_BC = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (2, C))
  q_BCNH, rows_BC1D = layers.latent_qkv(p, x_BCD, positions_BC, cfg)
  cache_B1CD = rows_BC1D.transpose(0, 2, 1, 3)
  expected_BCNV = layers.attend_latent(q_BCNH, cache_B1CD, p["w_kv_b_ANH"], positions_BC, cfg,
                                       absorbed=True)
  # The pool: sequence b's rows on pages table[b], NaN everywhere else.
  table = np.array([[3, 1], [4, 0], [0, 0]], np.int32)
  pages = np.full((6, Tp, D), np.nan, np.float32)
  rows = np.asarray(rows_BC1D[:, :, 0])
  for b, n in enumerate(lens):
    for j in range(n):
      pages[table[b, j // Tp], j % Tp] = rows[b, j]
  # The new tokens' absorbed queries, packed over the two sequences.
  nope, rank = cfg.qk_nope_head_dim, cfg.kv_lora_rank
  w_uk_ANH, w_uv_ANH = p["w_kv_b_ANH"][..., :nope], p["w_kv_b_ANH"][..., nope:]
  new = [(b, t) for b in range(2) for t in range(lens[b] - q_lens[b], lens[b])]
  q_TNH = jnp.stack([q_BCNH[b, t] for b, t in new])
  q_TND = jnp.concatenate([jnp.einsum("tnh,anh->tna", q_TNH[..., :nope], w_uk_ANH),
                           q_TNH[..., nope:]], axis=-1)
  args = (q_TND, jnp.asarray(unview_latent_pages(pages)), jnp.asarray(table),
          jnp.asarray([0, 5, 6, 6], jnp.int32), jnp.asarray([21, 9, 0], jnp.int32),
          jnp.asarray([2], jnp.int32))
  validate_inputs(*args, kv_lora_rank=rank)
  out_TNA, lse_TN = _run(impl, args, rank=rank, sm_scale=cfg.attn_scale)
  got_TNV = jnp.einsum("tna,anh->tnh", out_TNA, w_uv_ANH)
  np.testing.assert_allclose(np.asarray(got_TNV),
                             np.stack([np.asarray(expected_BCNV[b, t]) for b, t in new]),
                             atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(lse_TN)).all()
