"""expert_dispatch: Pallas kernel (interpret) vs jnp reference vs a loop-over-experts oracle.

Every case reads a pool larger than the model through a scattered slot table, and every slot
the model does not own is filled with NaN: a kernel or reference that touches another slot
fails. A second oracle nobody here wrote: JAX's bundled megablox `gmm` (interpret mode).
"""

import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

from pallas_kernels.expert_dispatch import (
  default_tiling,
  expert_dispatch,
  expert_dispatch_reference,
  validate_inputs,
)
from pallas_kernels.expert_dispatch import kernel as kernel_lib
from pallas_kernels.expert_dispatch import reference as reference_lib

# Tolerances, stated once: (atol, rtol) by dtype. The oracle runs in float64 on the same
# (rounded) inputs; bf16 additionally rounds the hidden activation to bf16 before the down
# matmul, as the kernel and reference do.
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}


def loop_oracle(x_TD, topk_ids_TK, topk_weights_TK, slot_table_E, w_gate_SDF, w_up_SDF,
                w_down_SFD, valid_T=None):
  """Per token, per choice: weights * (silu(x @ Wg) * (x @ Wu)) @ Wd, in float64."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
  x, w, wg, wu, wd = map(f64, (x_TD, topk_weights_TK, w_gate_SDF, w_up_SDF, w_down_SFD))
  ids, table = np.asarray(topk_ids_TK), np.asarray(slot_table_E)
  T, K = ids.shape
  y = np.zeros(x.shape)
  for t in range(T):
    if valid_T is not None and not valid_T[t]:
      continue
    for k in range(K):
      s = table[ids[t, k]]
      gate, up = x[t] @ wg[s], x[t] @ wu[s]
      y[t] += w[t, k] * ((gate / (1.0 + np.exp(-gate)) * up) @ wd[s])
  return y


def make_case(seed, *, T, K, E, S, D=16, F=32, dtype=jnp.float32, routing="random"):
  """Random inputs over a NaN-poisoned pool of S slots holding the E experts scattered.

  routing: "random"; "few" (only experts 0 and E-1 get tokens, the rest have zero);
    "one" (all tokens to one expert).
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((T, D)).astype(np.float32)
  if routing == "one":
    ids = np.full((T, K), E // 2)
  elif routing == "few":
    ids = rng.choice([0, E - 1], size=(T, K))
  else:
    ids = np.stack([rng.choice(E, size=K, replace=K > E) for _ in range(T)])
  weights = rng.random((T, K)).astype(np.float32)
  table = rng.permutation(S)[:E].astype(np.int32)
  pools = [rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1])
           for shape in ((S, D, F), (S, D, F), (S, F, D))]
  unused = np.setdiff1d(np.arange(S), table)
  for p in pools:
    p[unused] = np.nan
  return (jnp.asarray(x, dtype), jnp.asarray(ids, jnp.int32), jnp.asarray(weights),
          jnp.asarray(table), *(jnp.asarray(p, dtype) for p in pools))


def assert_close(actual, expected, dtype):
  atol, rtol = TOL[dtype]
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  assert np.isfinite(actual).all()
  np.testing.assert_allclose(actual, np.asarray(expected, np.float32), atol=atol, rtol=rtol)


dispatch = jax.jit(expert_dispatch, static_argnames=("impl", "tiling"))


# Every case uses these shapes (T tokens, E experts, S pool slots, m-tile 16, tk=8, tn=16: several
# k- and n-blocks, so the f32 accumulation over k is exercised), so the jit cache is shared
# between tests: compiling, not running, is what costs time here.
T, E, S = 12, 8, 24
TILING = (16, 8, 16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("K,routing", [
    (1, "random"), (2, "random"), (8, "random"), (2, "few"), (2, "one"),
])
def test_interpret_and_reference_match_loop_oracle(K, routing, dtype):
  args = make_case(K * 10 + len(routing), T=T, K=K, E=E, S=S, dtype=dtype, routing=routing)
  expected = loop_oracle(*args)
  reference = dispatch(*args, impl="reference")
  interpret = dispatch(*args, impl="interpret", tiling=TILING)
  assert reference.dtype == interpret.dtype == dtype
  assert_close(reference, expected, dtype)
  assert_close(interpret, expected, dtype)
  assert_close(interpret, reference, dtype)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), num_valid=st.integers(0, T),
                  K=st.sampled_from([2, 8]), routing=st.sampled_from(["random", "few", "one"]))
def test_randomized_routing_with_padding(seed, num_valid, K, routing):
  """Random routing, slot tables and a valid prefix of the T tokens (the rest padding)."""
  args = make_case(seed, T=T, K=K, E=E, S=S, routing=routing)
  valid = np.arange(T) < num_valid
  expected = loop_oracle(*args, valid_T=valid)
  for impl, tiling in (("interpret", TILING), ("reference", None)):
    y = dispatch(*args, valid_T=jnp.asarray(valid), impl=impl, tiling=tiling)
    assert_close(y, expected, jnp.float32)


def test_padding_tokens_are_zero_and_ignored():
  x, ids, w, table, *pools = make_case(3, T=T, K=2, E=E, S=S)
  valid = jnp.asarray([True, False] * 5 + [False, False])
  # Padding tokens may carry garbage ids and weights.
  ids = jnp.where(valid[:, None], ids, jnp.asarray([[-1, 1000]]))
  w = jnp.where(valid[:, None], w, jnp.nan)
  expected = loop_oracle(x, ids, w, table, *pools, valid_T=np.asarray(valid))
  for impl, tiling in (("interpret", TILING), ("reference", None)):
    y = dispatch(x, ids, w, table, *pools, valid_T=valid, impl=impl, tiling=tiling)
    assert_close(y, expected, jnp.float32)
    assert not np.asarray(y)[~np.asarray(valid)].any()
  all_padding = jnp.zeros((T,), bool)
  for impl, tiling in (("interpret", TILING), ("reference", None)):
    y = dispatch(x, ids, w, table, *pools, valid_T=all_padding, impl=impl, tiling=tiling)
    np.testing.assert_array_equal(np.asarray(y), 0.0)


def test_nan_poisoned_slots_and_ragged_dot_on_cpu():
  """The NaN-safe paths stay finite; ragged_dot over all pool slots does not (CPU, jax 0.10.2).

  ragged_dot's CPU lowering multiplies every slot (a zero-masked lhs times each group), so
  0 * NaN from an unreferenced slot reaches every output. If this assertion starts failing, a
  jax upgrade made ragged_dot sparse on CPU and it could become the CPU path again.
  """
  args = make_case(5, T=T, K=2, E=E, S=S)
  expected = loop_oracle(*args)
  assert_close(dispatch(*args, impl="reference"), expected, jnp.float32)
  assert_close(dispatch(*args, impl="interpret", tiling=TILING), expected, jnp.float32)
  poisoned = expert_dispatch_reference(*args, use_ragged_dot=True)
  assert np.isnan(np.asarray(poisoned)).any()
  # Without poison the ragged_dot formulation agrees: the NaN is the only difference.
  clean = [jnp.nan_to_num(p, nan=0.0) for p in args[4:]]
  assert_close(expert_dispatch_reference(*args[:4], *clean, use_ragged_dot=True), expected,
               jnp.float32)


@pytest.mark.parametrize("kernel_fn", [kernel_lib.gmm_tpu, kernel_lib.gmm_gpu],
                         ids=["tpu_kernel", "gpu_kernel"])
def test_grouped_matmul_matches_megablox(kernel_fn):
  """Both kernels (interpret) vs megablox gmm on the weights gathered to its [G, K, N]."""
  rng = np.random.default_rng(6)
  M, D, F, S = 64, 16, 32, 11
  slots = jnp.asarray([9, 1, 4, 6, 2], jnp.int32)  # ascending order is not required here
  sizes = jnp.asarray([7, 0, 33, 0, 20], jnp.int32)  # 60 of 64 rows: 4 rows of no group
  lhs = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
  pool = rng.standard_normal((S, D, F)).astype(np.float32)
  pool[np.setdiff1d(np.arange(S), np.asarray(slots))] = np.nan
  pool = jnp.asarray(pool)
  expected = megablox_gmm(lhs, pool[slots], sizes, tiling=(16, 16, 32), interpret=True)
  ours = kernel_fn(lhs, (pool,), slots, sizes, tiling=(16, 8, 16), out_dtype=jnp.float32,
                   swiglu=False, interpret=True)
  covered = int(sizes.sum())
  np.testing.assert_allclose(ours[:covered], expected[:covered], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
      reference_lib.grouped_matmul(lhs, pool, slots, sizes)[:covered], expected[:covered],
      atol=1e-5, rtol=1e-5)


def test_gpu_kernel_fused_swiglu_interpret():
  rng = np.random.default_rng(7)
  M, D, F, S = 32, 16, 32, 6
  slots, sizes = jnp.asarray([5, 0, 3], jnp.int32), jnp.asarray([3, 29, 0], jnp.int32)
  lhs = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
  wg, wu = (jnp.asarray(rng.standard_normal((S, D, F)), jnp.float32) for _ in range(2))
  ours = kernel_lib.gmm_gpu(lhs, (wg, wu), slots, sizes, tiling=(16, 8, 16),
                            out_dtype=jnp.float32, swiglu=True, interpret=True)
  gmm = reference_lib.grouped_matmul
  expected = reference_lib.swiglu(gmm(lhs, wg, slots, sizes), gmm(lhs, wu, slots, sizes))
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_tile_rows_follows_the_mean_group_size():
  tile_rows = reference_lib.tile_rows
  assert tile_rows(4, 16) == 4  # decode of one token, top-4: never more rows than there are
  assert tile_rows(32, 16) == 4  # mean 2: at least 4
  assert tile_rows(128, 16) == 8  # mean 8
  assert tile_rows(96, 8) == 16  # mean 12 -> 16
  assert tile_rows(4096, 16) == 64  # mean 256: at most 64
  assert tile_rows(1, 8) == 1


@pytest.mark.parametrize("block_m", [None, 1, 3, 8, 64])
def test_grouped_swiglu_tiles_match_float64_oracle(block_m):
  """Groups of 0 to 33 rows over tiles of every size (a group spanning tiles, the last window
  clamped to the rows); empty groups' slots and every unused slot hold NaN; rows of no group
  come out zero."""
  rng = np.random.default_rng(16)
  M, D, F, S = 64, 16, 32, 11
  slots = np.asarray([9, 1, 4, 6, 2], np.int32)
  sizes = np.asarray([7, 0, 33, 0, 20], np.int32)  # 60 of 64 rows
  x = rng.standard_normal((M, D)).astype(np.float32)
  pools = [rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1])
           for shape in ((S, D, F), (S, D, F), (S, F, D))]
  for p in pools:  # slots 1 and 6 belong to the empty groups
    p[np.setdiff1d(np.arange(S), slots[sizes > 0])] = np.nan
  y = reference_lib.grouped_swiglu(jnp.asarray(x), *map(jnp.asarray, pools), jnp.asarray(slots),
                                   jnp.asarray(sizes), block_m=block_m)
  wg, wu, wd = (p.astype(np.float64) for p in pools)
  expected = np.zeros((M, D))
  row = 0
  for slot, size in zip(slots, sizes, strict=True):
    xs = x[row:row + size].astype(np.float64)
    gate, up = xs @ wg[slot], xs @ wu[slot]
    expected[row:row + size] = (gate / (1.0 + np.exp(-gate)) * up) @ wd[slot]
    row += size
  assert_close(y, expected, jnp.float32)


def test_experts_without_tokens_are_never_read():
  """An expert of the layer that no token picked may hold NaN (say, being swapped in)."""
  x, _, w, table, *pools = make_case(17, T=T, K=2, E=E, S=S)
  ids = jnp.asarray(np.random.default_rng(17).choice([1, 5], size=(T, 2)), jnp.int32)
  expected = loop_oracle(x, ids, w, table, *pools)
  idle = np.asarray(table)[np.setdiff1d(np.arange(E), [1, 5])]
  pools = [p.at[idle].set(jnp.nan) for p in pools]
  assert_close(dispatch(x, ids, w, table, *pools, impl="reference"), expected, jnp.float32)


def test_batched_capacities():
  caps = reference_lib.batched_capacities
  # decode of 32 tokens, top-4 of 16 experts: mean 8, up to 1.5 x 8 + 4
  assert caps(128, 16, 16) == (8, 10, 12, 14, 16)
  assert caps(32, 16, 16) == (2, 3, 4, 6, 8)  # 8 tokens: mean 2, up to 8
  assert caps(36, 16, 16) == (3, 4, 6, 8)  # mean 2.25 -> 3, then even numbers
  # a prefill of 1024 tokens: mean 256 in steps of 256 / 8
  assert caps(4096, 16, 16) == (256, 288, 320, 352, 384)
  assert caps(16, 16, 16) == ()  # 4 tokens: too few pairs, the loop
  assert caps(128, 24, 16) == ()  # a pool holding more than the layer's experts: the loop


# Routings of T=12 tokens over E=8 experts (K=2), the last 2 tokens padding: (ids of token t,
# the batched path's branch: 0 to 3 its capacities 3, 4, 6 and 8, 4 the loop).
OWN_EXPERT_ROUTINGS = {
    "even": (lambda t: [(2 * t) % 8, (2 * t + 1) % 8], 0),  # every expert, <= 3 pairs each
    "balanced": (lambda t: [(2 * t) % 6, (2 * t + 1) % 6], 1),  # 6 experts, <= 4 pairs each
    "skewed": (lambda t: [t % 3, 3 + t % 2], 2),  # experts 3 and 4: 5 pairs each
    "crowded": (lambda t: [0 if t < 7 else 1 + t % 3, 4 + t % 3], 3),  # expert 0: 7 pairs
    "one": (lambda t: [4, 4], 4),  # 20 pairs on one expert
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("routing", list(OWN_EXPERT_ROUTINGS))
def test_batched_path_on_the_layers_own_experts(routing, dtype):
  """A pool of exactly the layer's E experts (permuted): the batched path, a switch over the
  capacities, with the loop past them; each case's branch is checked from its group sizes.
  The experts nobody picked hold NaN and padding tokens carry garbage ids and weights:
  neither reaches a result."""
  ids_of, branch = OWN_EXPERT_ROUTINGS[routing]
  x, _, w, table, *pools = make_case(18, T=T, K=2, E=E, S=E, dtype=dtype)
  valid = np.arange(T) < T - 2
  ids = np.asarray([ids_of(t) if valid[t] else [-5, 99] for t in range(T)], np.int32)
  sizes = np.bincount(ids[valid].ravel(), minlength=E)
  capacities = reference_lib.batched_capacities(T * 2, E, E)
  assert capacities == (3, 4, 6, 8)
  assert sum(sizes.max() > c for c in capacities) == branch
  pools = [p.at[np.asarray(table)[sizes == 0]].set(jnp.nan) for p in pools]
  w = jnp.where(jnp.asarray(valid)[:, None], w, jnp.nan)
  expected = loop_oracle(x, ids, w, table, *pools, valid_T=valid)
  y = dispatch(x, jnp.asarray(ids), w, table, *pools, valid_T=jnp.asarray(valid),
               impl="reference")
  assert y.dtype == dtype
  assert_close(y, expected, dtype)
  assert not np.asarray(y)[~valid].any()


def test_visit_metadata_covers_every_row_once():
  sizes = jnp.asarray([0, 5, 0, 0, 27, 16, 0], jnp.int32)
  offsets, groups, tiles = kernel_lib.visit_metadata(sizes, 64, 16)
  assert groups.shape == (64 // 16 + 7 - 1,)
  covered = np.zeros(64, int)
  seen = set()
  for g, t in zip(np.asarray(groups), np.asarray(tiles), strict=True):
    if (g, t) in seen:  # padding visits repeat the last real one
      continue
    seen.add((g, t))
    rows = np.arange(16 * t, 16 * t + 16)
    covered[rows[(rows >= offsets[g]) & (rows < offsets[g + 1])]] += 1
  np.testing.assert_array_equal(covered[:48], 1)  # sum(sizes) == 48
  np.testing.assert_array_equal(covered[48:], 0)  # rows of no group: never written


def _lower(platform, dtype=jnp.bfloat16, tiling=None, D=256, F=512):
  args = make_case(8, T=32, K=2, E=8, S=12, D=D, F=F, dtype=dtype)
  f = jax.jit(lambda *a: expert_dispatch(*a, impl="pallas", tiling=tiling))
  return f.trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_for_tpu(dtype):
  text = _lower("tpu", dtype)
  assert "tpu_custom_call" in text and "triton" not in text
  tm, tk, tn = kernel_lib.resolve_tiling(None, "tpu", 64, 256, 512, 256, 512, dtype)
  tm = min(tm, 64)
  assert f"expert_gmm_swiglu_tm{tm}_tk{tk}_tn{tn}" in text
  assert re.search(r"expert_gmm_down_tm\d+_tk\d+_tn\d+", text)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_for_cuda(dtype):
  text = _lower("cuda", dtype)
  assert "triton" in text and "tpu_custom_call" not in text
  assert "expert_gmm_swiglu_tm64_tk64_tn128" in text


def test_tiling_override_tuple_and_callable():
  assert "expert_gmm_swiglu_tm32_tk128_tn256" in _lower("tpu", tiling=(32, 128, 256))
  text = _lower("tpu", tiling=lambda m, k, n: (16, k, 128))
  assert "expert_gmm_swiglu_tm16_tk256_tn128" in text
  assert "expert_gmm_down_tm16_tk512_tn128" in text


def test_tiling_table_and_fallback():
  assert default_tiling("tpu", 4096, 14336, jnp.bfloat16) == (512, 1024, 1024)
  assert default_tiling("tpu", 96, 160, jnp.float32) == (128, 512, 512)
  # tk / tn that do not divide the dim fall back to the full dim (always a legal block).
  assert kernel_lib.resolve_tiling((16, 64, 128), "tpu", 40, 96, 160, 96, 160,
                                   jnp.float32) == (16, 96, 160)


def test_reference_does_not_gather_or_copy_expert_weights():
  """The compiled CPU path holds no [E, D, F] array and copies no pool."""
  args = make_case(9, T=16, K=2, E=8, S=12, D=16, F=48)
  hlo = jax.jit(expert_dispatch_reference).lower(*args).compile().as_text()
  assert "f32[8,16,48]" not in hlo and "f32[8,48,16]" not in hlo
  assert not re.search(r"f32\[12,(16,48|48,16)\]\S* copy\(", hlo)


def test_validate_inputs_accepts_good_inputs():
  _, ids, w, table, *_ = make_case(10, T=6, K=2, E=4, S=9)
  validate_inputs(ids, w, table, num_slots=9)


@pytest.mark.parametrize("edit,match", [
    (lambda a: a["ids"].__setitem__((2, 1), 4), r"topk_ids_TK\[2, 1\] = 4 .*\[0, 4\)"),
    (lambda a: a["ids"].__setitem__((0, 0), -1), r"topk_ids_TK\[0, 0\] = -1"),
    (lambda a: a["w"].__setitem__((3, 0), np.inf), r"topk_weights_TK\[3, 0\] = inf"),
    (lambda a: a["table"].__setitem__(1, 9), r"slot_table_E\[1\] = 9 .*\[0, 9\)"),
    (lambda a: a["table"].__setitem__(3, a["table"][0]),
     r"slot_table_E\[0\] and slot_table_E\[3\]"),
])
def test_validate_inputs_names_the_bad_value(edit, match):
  _, ids, w, table, *_ = make_case(11, T=6, K=2, E=4, S=9)
  a = {"ids": np.array(ids), "w": np.array(w), "table": np.array(table)}
  edit(a)
  with pytest.raises(ValueError, match=match):
    validate_inputs(a["ids"], a["w"], a["table"], num_slots=9)


def test_validate_inputs_skips_padding_tokens():
  _, ids, w, table, *_ = make_case(12, T=4, K=2, E=4, S=9)
  ids, w = np.array(ids), np.array(w)
  ids[3], w[3] = -7, np.nan
  validate_inputs(ids, w, table, num_slots=9, valid_T=np.array([True, True, True, False]))
  with pytest.raises(ValueError, match=r"topk_ids_TK\[3, 0\] = -7"):
    validate_inputs(ids, w, table, num_slots=9)


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.__setitem__(4, a[4][:, :8]), r"w_gate_SDF must be \[S, D=16, F\]"),
    (lambda a: a.__setitem__(6, a[6][:, :, :8]), r"w_down_SFD must be \[S, F, D\]"),
    (lambda a: a.__setitem__(5, a[5].astype(jnp.bfloat16)), r"w_up_SDF dtype bfloat16"),
    (lambda a: a.__setitem__(1, a[1][:3]), r"topk_ids_TK must be \[T=6, K\]"),
    (lambda a: a.__setitem__(1, a[1].astype(jnp.float32)), r"topk_ids_TK must be integer"),
    (lambda a: a.__setitem__(2, a[2][:, :1]), r"topk_weights_TK must have the shape"),
    (lambda a: a.__setitem__(3, jnp.arange(12, dtype=jnp.int32)), r"pool has only 9 slots"),
])
def test_trace_time_shape_errors(edit, match):
  args = list(make_case(13, T=6, K=2, E=4, S=9))
  edit(args)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda *a: expert_dispatch(*a, impl="reference"), *args)


def test_bad_valid_mask_and_impl():
  args = make_case(14, T=6, K=2, E=4, S=9)
  with pytest.raises(ValueError, match=r"valid_T must be \[T=6\]"):
    expert_dispatch(*args, valid_T=jnp.ones((5,), bool), impl="reference")
  with pytest.raises(ValueError, match="impl must be one of"):
    expert_dispatch(*args, impl="mosaic")


def test_default_impl_on_cpu_is_the_reference():
  args = make_case(15, T=T, K=2, E=E, S=S)
  np.testing.assert_array_equal(dispatch(*args), dispatch(*args, impl="reference"))
