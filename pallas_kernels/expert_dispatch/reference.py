"""Expert dispatch over a slot-indexed weight pool: the plain-jnp oracle and CPU path.

Glossary: T tokens, K top-k choices per token, D model dim, F expert hidden dim, E experts of
the model (one layer), S slots of the weights pool (experts of many models), G groups of the
grouped matmul (G == E: one group per expert of the layer, in ascending slot order), M rows of
the grouped matmul (M == T * K (token, choice) pairs, possibly padded), C rows per slot of the
batched path (its capacity).

Steps: map expert id -> slot -> sort the (token, choice) pairs by slot -> grouped matmul
gate/up + SwiGLU, then down, reading the pool *through the slot table* -> un-permute and
combine with the router weights (f32 accumulation, output in x's dtype).

About `jax.lax.ragged_dot` on CPU (jax 0.10.2), measured: its CPU lowering is dense. It expands
the lhs to [num_groups, M, K] (rows outside a group zeroed), transposes and copies the *whole*
rhs to [num_groups * K, N] and does one dense matmul. Applied to the pool with group sizes over
slots this (a) multiplies by every slot of the pool, so a NaN/Inf in any slot the layer does not
reference (a free slot, another model's expert, a slot being swapped in) poisons every output
row (0 * NaN == NaN), (b) costs S / E times the flops of the layer and a copy of the whole pool
per call. `grouped_matmul_ragged_dot` below keeps that formulation for comparison (the tests
pin the NaN behaviour). The production CPU path has two forms, both NaN-safe:

- `grouped_swiglu`, any pool: one loop over the groups that received rows (a traced trip
  count), each slicing its slot's gate, up and down weights out of the pool once, and inside a
  group a loop over row tiles computing gate, up, SwiGLU and down on the tile. It reads only
  the slots of groups with rows, never multiplies by an unreferenced slot, and never gathers
  the weights of several experts into a new array. The tile has about the mean group size
  (`tile_rows`), since every group computes whole tiles whatever its size: at T=32, K=4, E=16
  (decode of a batch of 32) a fixed 128-row tile computes 16 x 128 rows for 128 real ones. But
  XLA:CPU copies each dynamically indexed slot slice before its matmul (a matmul does not read
  one in place), so the weights cross memory twice, and each group pays a few small programs.
- `batched_swiglu`, where the pool is exactly the layer's experts (S == E: its own params, as
  the reference forward and the colocated engine pass them) and the pairs are many
  (`batched_capacities`): the pairs are placed in a [S, C, D] block by slot and rank (no sort)
  and the three matmuls run batched over every slot, reading the pool in place. A slot's rows
  see only that slot's weights and only real pairs' rows are gathered back, so a slot nobody
  picked is multiplied but never reaches a result, whatever it holds. Exact when C holds the
  fullest slot: `expert_dispatch_reference` switches (`lax.switch`) to the smallest capacity
  that does, and to the loop past the largest.

`grouped_matmul` is the loop's walk for one matmul (the oracle of the kernels' grouped
matmuls).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """The (token, choice) pairs sorted by slot, and the groups of the grouped matmul.

  Attributes:
    order_M: int32 [M], M = T * K. Sorted position -> flat pair index t * K + k. Pairs of
      padding tokens sort last and belong to no group.
    group_slots_G: int32 [G], G = E. Slot of each group, ascending (the slot table sorted).
    group_sizes_G: int32 [G]. Number of valid pairs routed to each group; may be zero.
  """

  order_M: jax.Array
  group_slots_G: jax.Array
  group_sizes_G: jax.Array


def route(topk_ids_TK: jax.Array, slot_table_E: jax.Array,
          valid_T: jax.Array | None = None) -> Routing:
  """Maps expert ids to slots and sorts the (token, choice) pairs by slot.

  Args:
    topk_ids_TK: int [T, K], expert id of each token's k-th choice, in [0, E).
    slot_table_E: int32 [E], pool slot of each expert of this layer (distinct entries).
    valid_T: optional bool [T]; False marks a padding token (not dispatched, output zero,
      its ids are ignored). None: all tokens are valid.

  Returns:
    A `Routing`.
  """
  T, K = topk_ids_TK.shape
  E = slot_table_E.shape[0]
  slot_table_E = jnp.asarray(slot_table_E, jnp.int32)
  # Groups in ascending slot order; rank_E[e] is the group of expert e. Sorting pairs by group
  # is sorting them by slot, since the slot table is injective.
  experts_by_slot_G = jnp.argsort(slot_table_E, stable=True).astype(jnp.int32)
  rank_E = jnp.zeros((E,), jnp.int32).at[experts_by_slot_G].set(jnp.arange(E, dtype=jnp.int32))
  ids_M = jnp.clip(topk_ids_TK.reshape(T * K).astype(jnp.int32), 0, E - 1)
  key_M = rank_E[ids_M]
  if valid_T is not None:
    valid_M = jnp.repeat(valid_T.astype(bool), K)
    key_M = jnp.where(valid_M, key_M, E)  # padding pairs: past the last group
  order_M = jnp.argsort(key_M, stable=True).astype(jnp.int32)
  group_sizes_G = jnp.zeros((E + 1,), jnp.int32).at[key_M].add(1)[:E]
  return Routing(order_M, slot_table_E[experts_by_slot_G], group_sizes_G)


def tile_rows(num_rows: int, num_groups: int) -> int:
  """Rows per tile of the CPU grouped matmuls: about the mean group size.

  The mean group size rounded up to a power of two, clamped to [4, 64], and at most
  `num_rows`. Measured on CPU (D=256, F=128): a [tm, 256] x [256, 128] matmul in the loop costs
  about 5 us plus 0.8 us a row, so tiles near the group size waste least; past 64 rows a tile
  is no faster per row.
  """
  mean = -(-num_rows // max(num_groups, 1))
  return max(1, min(num_rows, 64, max(4, 1 << (mean - 1).bit_length())))


def _grouped_tiles(lhs_MK: jax.Array, weights_SXY: tuple[jax.Array, ...],
                   group_slots_G: jax.Array, group_sizes_G: jax.Array, num_cols: int,
                   tile_fn, block_m: int | None) -> jax.Array:
  """Runs `tile_fn` on every row tile of every group with rows, reading its slot's weights.

  Args:
    lhs_MK: [M, K] rows sorted by group (see `grouped_matmul`).
    weights_SXY: pools indexed by slot on axis 0.
    group_slots_G, group_sizes_G: int32 [G], slot and row count of each group.
    num_cols: N, columns of tile_fn's result.
    tile_fn: (rows [tm, K], weights of the group's slot) -> f32 [tm, N].
    block_m: rows per tile; None: `tile_rows(M, G)`.

  Returns:
    f32 [M, N]: row m holds tile_fn of its group; rows past sum(group_sizes_G) are zero.
  """
  group_slots_G = jnp.asarray(group_slots_G, jnp.int32)
  group_sizes_G = jnp.asarray(group_sizes_G, jnp.int32)
  M = lhs_MK.shape[0]
  G = group_sizes_G.shape[0]
  tm = min(block_m or tile_rows(M, G), M)
  ends_G = jnp.cumsum(group_sizes_G)
  starts_G = ends_G - group_sizes_G
  # Groups with rows first: empty groups are never visited, so their slots are never read.
  busy_G = jnp.argsort(group_sizes_G == 0, stable=True).astype(jnp.int32)
  row_iota = jnp.arange(tm, dtype=jnp.int32)[:, None]

  def group_body(j, out_MN):
    g = busy_G[j]
    start, size = starts_G[g], group_sizes_G[g]
    w_XY = tuple(jax.lax.dynamic_index_in_dim(w, group_slots_G[g], axis=0, keepdims=False)
                 for w in weights_SXY)

    def tile_body(i, out_MN):
      row0 = start + i * tm
      row0c = jnp.minimum(row0, M - tm)  # keep the window in bounds; mask the overlap
      rows_tK = jax.lax.dynamic_slice_in_dim(lhs_MK, row0c, tm, axis=0)
      y_tN = tile_fn(rows_tK, *w_XY)
      r = row_iota + row0c
      mask = (r >= row0) & (r < start + size)
      cur_tN = jax.lax.dynamic_slice_in_dim(out_MN, row0c, tm, axis=0)
      return jax.lax.dynamic_update_slice_in_dim(
          out_MN, jnp.where(mask, y_tN, cur_tN), row0c, axis=0)

    return jax.lax.fori_loop(0, (size + tm - 1) // tm, tile_body, out_MN)

  return jax.lax.fori_loop(0, jnp.sum(group_sizes_G > 0), group_body,
                           jnp.zeros((M, num_cols), jnp.float32))


def grouped_matmul(lhs_MK: jax.Array, w_SKN: jax.Array, group_slots_G: jax.Array,
                   group_sizes_G: jax.Array, *, out_dtype=jnp.float32,
                   block_m: int | None = None) -> jax.Array:
  """NaN-safe grouped matmul on the pool: rows of group g times the slot group_slots_G[g].

  Loops over the groups with rows and, inside a group, over row tiles of `block_m` rows, so
  the cost is about (M + G * block_m) * K * N multiply-adds and only referenced slots are read.

  Args:
    lhs_MK: [M, K] rows sorted by group; group g owns rows
      [sum(group_sizes_G[:g]), sum(group_sizes_G[:g + 1])).
    w_SKN: [S, K, N] the weights pool.
    group_slots_G: int32 [G], slot of each group.
    group_sizes_G: int32 [G], rows of each group; rows past their sum are left zero.
    out_dtype: dtype of the result (the products accumulate in f32).
    block_m: rows per tile; None: `tile_rows(M, G)`.

  Returns:
    [M, N] in `out_dtype`; rows past sum(group_sizes_G) are zero.
  """

  def tile_fn(rows_tK, w_KN):
    return jnp.dot(rows_tK, w_KN, preferred_element_type=jnp.float32)

  out_MN = _grouped_tiles(lhs_MK, (w_SKN,), group_slots_G, group_sizes_G, w_SKN.shape[2],
                          tile_fn, block_m)
  return out_MN.astype(out_dtype)


def swiglu_rows(x_tD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array,
                w_down_FD: jax.Array) -> jax.Array:
  """One expert on rows x_tD: silu(x @ w_gate) * (x @ w_up) in f32, rounded to x's dtype, then
  @ w_down; f32 [t, D]. The one expert formula of the CPU paths (per tile, or vmapped)."""
  gate_tF = jnp.dot(x_tD, w_gate_DF, preferred_element_type=jnp.float32)
  up_tF = jnp.dot(x_tD, w_up_DF, preferred_element_type=jnp.float32)
  h_tF = swiglu(gate_tF, up_tF).astype(x_tD.dtype)
  return jnp.dot(h_tF, w_down_FD, preferred_element_type=jnp.float32)


def grouped_swiglu(x_MD: jax.Array, w_gate_SDF: jax.Array, w_up_SDF: jax.Array,
                   w_down_SFD: jax.Array, group_slots_G: jax.Array, group_sizes_G: jax.Array,
                   *, block_m: int | None = None) -> jax.Array:
  """The SwiGLU experts on rows sorted by group, fused per row tile (the CPU loop).

  Per tile of group g (slot s = group_slots_G[g]): `swiglu_rows` with slot s's weights — what
  `grouped_matmul` thrice computes, in one walk.

  Args:
    x_MD: [M, D] rows sorted by group (as `grouped_matmul`'s lhs).
    w_gate_SDF, w_up_SDF: [S, D, F] pools. w_down_SFD: [S, F, D] pool.
    group_slots_G, group_sizes_G: int32 [G], slot and row count of each group.
    block_m: rows per tile; None: `tile_rows(M, G)`.

  Returns:
    f32 [M, D]; rows past sum(group_sizes_G) are zero.
  """
  return _grouped_tiles(x_MD, (w_gate_SDF, w_up_SDF, w_down_SFD), group_slots_G,
                        group_sizes_G, w_down_SFD.shape[2], swiglu_rows, block_m)


def slot_ranks(slots_M: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
  """Each pair's rank among the earlier pairs of its slot, and each slot's pair count.

  Args:
    slots_M: int32 [M] slot of each (token, choice) pair; `num_slots` for a pair of no slot
      (a padding token).
    num_slots: S.

  Returns:
    (rank_M int32: 0 for a slot's first pair, 1 for its second, ...; garbage for pairs of no
    slot; sizes_S int32 [S]).
  """
  onehot_MS = slots_M[:, None] == jnp.arange(num_slots, dtype=jnp.int32)
  seen_MS = jnp.cumsum(onehot_MS, axis=0, dtype=jnp.int32)
  own_M1 = jnp.minimum(slots_M, num_slots - 1)[:, None]
  return jnp.take_along_axis(seen_MS, own_M1, axis=1)[:, 0] - 1, seen_MS[-1]


def batched_swiglu(x_TD: jax.Array, slots_M: jax.Array, rank_M: jax.Array,
                   w_gate_SDF: jax.Array, w_up_SDF: jax.Array, w_down_SFD: jax.Array, *,
                   capacity: int) -> jax.Array:
  """The SwiGLU experts as matmuls batched over EVERY slot of the pool, `capacity` rows each.

  Row c of slot s is the token of the pair of slot s with rank c, zeros where there is none;
  `swiglu_rows` is vmapped over the slots, so each matmul reads the pool in place (no slice
  of it is copied). A slot's rows see only that slot's weights, and only the rows of real
  pairs are gathered back: a slot without pairs (an expert nobody picked, a filler slot) is
  multiplied but never reaches a result, whatever it holds. Exact only if every slot has at
  most `capacity` pairs (the caller's choice); costs S * capacity rows.

  Args:
    x_TD: [T, D] tokens; pair m is token m // K (K = M / T).
    slots_M, rank_M: int32 [M] slot and rank of each pair (`slot_ranks`); slot S: no slot.
    w_gate_SDF, w_up_SDF: [S, D, F] pools. w_down_SFD: [S, F, D] pool.
    capacity: rows per slot.

  Returns:
    f32 [M, D] in pair order; garbage for pairs of no slot.
  """
  T = x_TD.shape[0]
  M = slots_M.shape[0]
  S = w_gate_SDF.shape[0]
  pair_SC = jnp.full((S, capacity), M, jnp.int32).at[slots_M, rank_M].set(
      jnp.arange(M, dtype=jnp.int32), mode="drop")
  x_SCD = jnp.where((pair_SC < M)[..., None], x_TD[jnp.minimum(pair_SC, M - 1) // (M // T)], 0)
  y_SCD = jax.vmap(swiglu_rows)(x_SCD, w_gate_SDF, w_up_SDF, w_down_SFD)
  return y_SCD[jnp.minimum(slots_M, S - 1), jnp.clip(rank_M, 0, capacity - 1)]


def grouped_matmul_ragged_dot(lhs_MK: jax.Array, w_SKN: jax.Array, group_slots_G: jax.Array,
                              group_sizes_G: jax.Array, *, out_dtype=jnp.float32) -> jax.Array:
  """`jax.lax.ragged_dot` directly on the pool, group sizes over all S slots.

  NOT NaN-safe on CPU (see the module docstring): every slot of the pool enters the product.
  Same arguments and result as `grouped_matmul`.
  """
  S = w_SKN.shape[0]
  group_sizes_S = jnp.zeros((S,), jnp.int32).at[group_slots_G].set(group_sizes_G)
  M = lhs_MK.shape[0]
  # ragged_dot wants sum(group sizes) == M; padding rows go to no slot and come out zero.
  return jax.lax.ragged_dot(lhs_MK, w_SKN, group_sizes_S,
                            preferred_element_type=jnp.float32)[:M].astype(out_dtype)


def swiglu(gate_MF: jax.Array, up_MF: jax.Array) -> jax.Array:
  """silu(gate) * up in f32. gate_MF, up_MF: [M, F]."""
  gate_MF = gate_MF.astype(jnp.float32)
  return jax.nn.silu(gate_MF) * up_MF.astype(jnp.float32)


def combine(y_MD: jax.Array, routing: Routing, topk_weights_TK: jax.Array,
            valid_T: jax.Array | None, out_dtype) -> jax.Array:
  """Un-permutes the expert outputs and sums them over k with the router weights.

  Args:
    y_MD: [M', D] expert outputs in sorted order (M' >= T * K; rows of no group are ignored,
      whatever they hold).
    routing: the `Routing` that sorted the pairs.
    topk_weights_TK: [T, K] router weights.
    valid_T: optional bool [T]; padding tokens come out zero.
    out_dtype: dtype of the result.

  Returns:
    [T, D] in `out_dtype`, accumulated in f32.
  """
  return weighted_sum(unpermute(y_MD, routing), topk_weights_TK, valid_T, out_dtype)


def unpermute(y_MD: jax.Array, routing: Routing) -> jax.Array:
  """Expert outputs in sorted order [M', D] -> pair order [M, D] (M = T * K)."""
  M = routing.order_M.shape[0]
  inv_M = jnp.zeros((M,), jnp.int32).at[routing.order_M].set(jnp.arange(M, dtype=jnp.int32))
  return y_MD[inv_M]


def weighted_sum(y_MD: jax.Array, topk_weights_TK: jax.Array, valid_T: jax.Array | None,
                 out_dtype) -> jax.Array:
  """Sums each token's expert outputs over k with the router weights.

  Args:
    y_MD: [M, D] expert outputs in pair order (pair m = token m // K, choice m % K); rows of
      padding tokens are ignored, whatever they hold.
    topk_weights_TK: [T, K] router weights.
    valid_T: optional bool [T]; padding tokens come out zero.
    out_dtype: dtype of the result.

  Returns:
    [T, D] in `out_dtype`, accumulated in f32.
  """
  T, K = topk_weights_TK.shape
  y_TKD = y_MD.reshape(T, K, -1).astype(jnp.float32)
  contrib_TKD = topk_weights_TK.astype(jnp.float32)[:, :, None] * y_TKD
  if valid_T is not None:
    contrib_TKD = jnp.where(jnp.asarray(valid_T)[:, None, None], contrib_TKD, 0.0)
  return jnp.sum(contrib_TKD, axis=1).astype(out_dtype)


def batched_capacities(num_pairs: int, num_slots: int, num_experts: int) -> tuple[int, ...]:
  """Row capacities of the batched path (`batched_swiglu`) worth trying, smallest first.

  The batched path multiplies every slot of the pool, so it is only taken where the pool is
  the layer's own experts (num_slots == num_experts) and there are pairs enough for nearly
  every expert to have some (num_pairs >= 2 * num_slots). Its capacities run from the mean
  pairs per slot m up to 1.5 m + 4 (at least 8): 1, 2 and 3 where m is below 4, then even
  numbers (or multiples of m / 8 rounded down to a power of two, where that is larger: each
  branch padding under an eighth). Measured on CPU (D=256, F=128, S=16, top-4; ms per call,
  the least of 40 under load): a capacity costs about its rows rounded up to an even number
  (32 tokens: capacity 8 0.30, 10 0.38, 11 0.45, 12 0.44, 14 0.51, 16 0.57; 8 tokens: 4 0.19,
  5 0.21, 6 0.26, 8 0.31; 1024 tokens: 256 10.1, 288 12.3, 320 13.0, 352 14.2, 384 15.3), the
  loop about its groups and rows plus a copy of each busy expert's weights (which costs more
  inside a model step than here, the weights no longer in cache), and the batched path wins up
  to 1.5 m + 4, or 8: 8 tokens (m=2) loop 0.43, capacity 8 0.41; 32 tokens (m=8) loop 0.77,
  capacity 16 0.65, 24 1.03; 128 tokens (m=32) loop 2.6, 48 2.1, 64 3.9; 1024 tokens (m=256)
  loop 19, 384 17, 512 24. () otherwise: the loop only.
  """
  if num_slots != num_experts or num_pairs < 2 * num_slots:
    return ()
  mean = -(-num_pairs // num_slots)
  limit = min(num_pairs, max(8, (3 * mean) // 2 + 4))
  step = max(2, (1 << (mean.bit_length() - 1)) // 8)
  small = {c for c in (1, 2, 3) if mean <= c}
  return tuple(sorted(small | set(range(-(-mean // step) * step, limit + 1, step))))


def expert_dispatch_reference(x_TD, topk_ids_TK, topk_weights_TK, slot_table_E, w_gate_SDF,
                              w_up_SDF, w_down_SFD, *, valid_T=None, use_ragged_dot=False):
  """SwiGLU experts over the pool in plain jnp; see `expert_dispatch` for the arguments.

  The NaN-safe CPU path: where `batched_capacities` offers capacities, the batched path with
  the smallest one that holds the fullest slot (a `lax.switch` on the routing), else (a slot
  fuller than the largest) the loop over the groups, `grouped_swiglu`.

  use_ragged_dot: three `grouped_matmul_ragged_dot` calls (not NaN-safe on CPU) instead.
  """
  T, K = topk_ids_TK.shape
  pools = (w_gate_SDF, w_up_SDF, w_down_SFD)

  def loop():
    routing = route(topk_ids_TK, slot_table_E, valid_T)
    x_MD = x_TD[routing.order_M // K]
    groups = (routing.group_slots_G, routing.group_sizes_G)
    if use_ragged_dot:
      gate_MF = grouped_matmul_ragged_dot(x_MD, w_gate_SDF, *groups)
      up_MF = grouped_matmul_ragged_dot(x_MD, w_up_SDF, *groups)
      h_MF = swiglu(gate_MF, up_MF).astype(x_TD.dtype)
      y_MD = grouped_matmul_ragged_dot(h_MF, w_down_SFD, *groups)
    else:
      y_MD = grouped_swiglu(x_MD, *pools, *groups)
    return unpermute(y_MD, routing)

  S, E = w_gate_SDF.shape[0], slot_table_E.shape[0]
  capacities = () if use_ragged_dot else batched_capacities(T * K, S, E)
  if not capacities:
    y_MD = loop()
  else:
    ids_M = jnp.clip(topk_ids_TK.reshape(T * K).astype(jnp.int32), 0, E - 1)
    slots_M = jnp.asarray(slot_table_E, jnp.int32)[ids_M]
    if valid_T is not None:
      slots_M = jnp.where(jnp.repeat(jnp.asarray(valid_T, bool), K), slots_M, S)
    rank_M, sizes_S = slot_ranks(slots_M, S)
    fullest = jnp.max(sizes_S)
    branches = [functools.partial(batched_swiglu, x_TD, slots_M, rank_M, *pools, capacity=c)
                for c in capacities]
    index = sum((fullest > c).astype(jnp.int32) for c in capacities)
    y_MD = jax.lax.switch(index, [*branches, loop])
  return weighted_sum(y_MD, topk_weights_TK, valid_T, x_TD.dtype)
