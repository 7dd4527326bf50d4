"""write_kv: reference (scatter) and Pallas kernels (interpret) vs numpy; in place with donation.

The compiled HLO must not copy the pool (the trap: a scalar index / dynamic slice in
a donated jit copies the whole pool), the donated input must be deleted, and the kernels must
lower for TPU (Mosaic) and cuda (Triton).
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_write import kernel as kernel_lib
from pallas_kernels.kv_write import validate_inputs, write_kv
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

NUM_PAGES, PAGE_TOKENS, K, H = 6, 4, 2, 8
SLOTS = np.array([5, -1, 17, 2, 23, 1, -7], np.int32)  # -1/-7 dropped, 1 and 2 in null page 0


def make(seed=0, dtype=jnp.float32):
  T = len(SLOTS)
  rng = np.random.default_rng(seed)
  pool = rng.standard_normal((NUM_PAGES, 2 * PAGE_TOKENS * K * H)).astype(np.float32)
  k = rng.standard_normal((T, K, H)).astype(np.float32)
  v = rng.standard_normal((T, K, H)).astype(np.float32)
  cast = lambda a: np.asarray(jnp.asarray(a, dtype))  # noqa: E731
  return cast(pool), cast(k), cast(v)


def numpy_write(pool, k, v, slots):
  pages = pool.reshape(NUM_PAGES, 2, PAGE_TOKENS, K, H).copy()
  for t, s in enumerate(slots):
    if s >= 0:
      pages[s // PAGE_TOKENS, 0, s % PAGE_TOKENS] = k[t]
      pages[s // PAGE_TOKENS, 1, s % PAGE_TOKENS] = v[t]
  return pages.reshape(pool.shape)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_numpy_and_donates(impl, dtype):
  pool, k, v = make(dtype=dtype)
  expected = numpy_write(pool, k, v, SLOTS)
  validate_inputs(pool, k, v, SLOTS)
  pool_dev = jnp.asarray(pool)
  out = write_kv(pool_dev, jnp.asarray(k), jnp.asarray(v), jnp.asarray(SLOTS), impl=impl)
  assert pool_dev.is_deleted()
  assert out.shape == pool.shape and out.dtype == dtype
  # Page 0 (null) may hold anything; every other page is exact.
  np.testing.assert_array_equal(np.asarray(out)[1:], expected[1:])


def test_gpu_kernel_interpret_matches_numpy():
  pool, k, v = make(1)
  out = kernel_lib.write_kv_gpu(jnp.asarray(pool), jnp.asarray(k), jnp.asarray(v),
                                jnp.asarray(SLOTS), interpret=True)
  np.testing.assert_array_equal(np.asarray(out), numpy_write(pool, k, v, SLOTS))


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_compiled_hlo_does_not_copy_the_pool(impl):
  # Big enough that a pool-shaped copy is unambiguous (no other operand has NUM_PAGES rows).
  pool, k, v = make()
  text = write_kv.lower(jnp.asarray(pool), k, v, SLOTS, impl=impl).compile().as_text()
  pool_copies = [line for line in text.splitlines()
                 if re.search(rf"= \w+\[{NUM_PAGES},[^\]]*\]\S* copy\(", line)]
  assert not pool_copies, pool_copies
  assert "input_output_alias" in text or "may-alias" in text or "must-alias" in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers(platform, dtype):
  pool, k, v = make(dtype=dtype)
  text = write_kv.trace(jnp.asarray(pool), k, v, SLOTS, impl="pallas").lower(
      lowering_platforms=(platform,)).as_text()
  assert f"kv_write_{'tpu' if platform == 'tpu' else 'gpu'}_Tp{PAGE_TOKENS}" in text


def test_written_pages_are_what_attention_reads():
  """Prefill 6 tokens of one sequence via write_kv, then attention == dense causal numpy."""
  rng = np.random.default_rng(2)
  T, N = 6, 4
  pool = np.full((NUM_PAGES, 2 * PAGE_TOKENS * K * H), np.nan, np.float32)
  pages = [3, 5]  # scattered; page 0 null, others NaN
  slots = np.array([pages[i // PAGE_TOKENS] * PAGE_TOKENS + i % PAGE_TOKENS for i in range(T)],
                   np.int32)
  k, v, q = (rng.standard_normal(shape).astype(np.float32)
             for shape in ((T, K, H), (T, K, H), (T, N, H)))
  new_pool = write_kv(jnp.asarray(pool), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
  out, _ = ragged_paged_attention(
      jnp.asarray(q), new_pool, jnp.asarray([pages], jnp.int32), jnp.asarray([0, T], jnp.int32),
      jnp.asarray([T], jnp.int32), jnp.asarray([1], jnp.int32), kv_heads=K, impl="reference")
  kk, vv = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
  s = np.einsum("qnh,knh->nqk", q, kk) / np.sqrt(H)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  expected = np.einsum("nqk,knh->qnh", p / p.sum(-1, keepdims=True), vv)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)


def test_errors():
  pool, k, v = make()
  with pytest.raises(ValueError, match="page_elems=128 is not a positive multiple"):
    write_kv(jnp.asarray(pool), k[:, :, :6], v[:, :, :6], SLOTS)
  with pytest.raises(ValueError, match="v_TKH must have k_TKH's shape"):
    write_kv(jnp.asarray(pool), k, v[:-1], SLOTS)
  with pytest.raises(ValueError, match="slot_mapping_T must be int32"):
    write_kv(jnp.asarray(pool), k, v, SLOTS.astype(np.int64) + 0.5)
  with pytest.raises(ValueError, match="k_TKH dtype bfloat16 must equal pool_PE dtype float32"):
    write_kv(jnp.asarray(pool), k.astype(jnp.bfloat16), v, SLOTS)
  with pytest.raises(ValueError, match="impl must be one of"):
    write_kv(jnp.asarray(pool), k, v, SLOTS, impl="triton")
  with pytest.raises(ValueError, match=r"slot_mapping_T\[2\]=24 is past the pool's"):
    validate_inputs(pool, k, v, np.array([5, -1, 24, 2, 23, 1, -7], np.int32))
  with pytest.raises(ValueError, match=r"writes slot 5 more than once \(tokens \[0, 2\]\)"):
    validate_inputs(pool, k, v, np.array([5, -1, 5, 2, 23, 1, -7], np.int32))
  validate_inputs(pool, k, v, np.array([5, 1, 17, 1, 23, 1, -7], np.int32))  # page 0 repeats ok
