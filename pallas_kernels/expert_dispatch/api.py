"""The public expert-dispatch function and its host-side input validator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._impl import resolve_impl
from pallas_kernels.expert_dispatch import kernel as _kernel
from pallas_kernels.expert_dispatch import reference as _reference


def _check_shapes(x_TD, topk_ids_TK, topk_weights_TK, slot_table_E, w_gate_SDF, w_up_SDF,
                  w_down_SFD, valid_T):
  """Trace-time shape / dtype checks; raises ValueError naming the argument."""

  def need(cond, msg):
    if not cond:
      raise ValueError(msg)

  need(x_TD.ndim == 2, f"x_TD must be [T, D], got shape {x_TD.shape}")
  T, D = x_TD.shape
  need(jnp.issubdtype(x_TD.dtype, jnp.floating), f"x_TD must be floating, got {x_TD.dtype}")
  need(topk_ids_TK.ndim == 2 and topk_ids_TK.shape[0] == T,
       f"topk_ids_TK must be [T={T}, K], got shape {topk_ids_TK.shape}")
  need(jnp.issubdtype(topk_ids_TK.dtype, jnp.integer),
       f"topk_ids_TK must be integer, got {topk_ids_TK.dtype}")
  need(topk_weights_TK.shape == topk_ids_TK.shape,
       f"topk_weights_TK must have the shape of topk_ids_TK {topk_ids_TK.shape}, "
       f"got {topk_weights_TK.shape}")
  need(slot_table_E.ndim == 1 and slot_table_E.shape[0] >= 1,
       f"slot_table_E must be [E] with E >= 1, got shape {slot_table_E.shape}")
  need(jnp.issubdtype(slot_table_E.dtype, jnp.integer),
       f"slot_table_E must be integer, got {slot_table_E.dtype}")
  need(w_gate_SDF.ndim == 3 and w_gate_SDF.shape[1] == D,
       f"w_gate_SDF must be [S, D={D}, F], got shape {w_gate_SDF.shape}")
  S, _, F = w_gate_SDF.shape
  need(slot_table_E.shape[0] <= S,
       f"slot_table_E has {slot_table_E.shape[0]} experts but the pool has only {S} slots")
  need(w_up_SDF.shape == (S, D, F),
       f"w_up_SDF must be [S, D, F]={(S, D, F)}, got shape {w_up_SDF.shape}")
  need(w_down_SFD.shape == (S, F, D),
       f"w_down_SFD must be [S, F, D]={(S, F, D)}, got shape {w_down_SFD.shape}")
  for name, w in (("w_gate_SDF", w_gate_SDF), ("w_up_SDF", w_up_SDF), ("w_down_SFD", w_down_SFD)):
    need(w.dtype == x_TD.dtype, f"{name} dtype {w.dtype} must equal x_TD dtype {x_TD.dtype}")
  if valid_T is not None:
    need(valid_T.shape == (T,), f"valid_T must be [T={T}], got shape {valid_T.shape}")
    need(valid_T.dtype == jnp.bool_, f"valid_T must be bool, got {valid_T.dtype}")


def _pallas_moe(gmm, backend, x_TD, topk_ids_TK, topk_weights_TK, slot_table_E, w_gate_SDF,
                w_up_SDF, w_down_SFD, valid_T, tiling, interpret):
  T, K = topk_ids_TK.shape
  D, F = w_gate_SDF.shape[1:]
  M = T * K
  routing = _reference.route(topk_ids_TK, slot_table_E, valid_T)
  gu_tiling = _kernel.resolve_tiling(tiling, backend, M, D, F, D, F, x_TD.dtype)
  dn_tiling = _kernel.resolve_tiling(tiling, backend, M, F, D, D, F, x_TD.dtype)
  # Small batches (decode): no m-tile larger than the rows, rounded to a power of two >= 16.
  tm = min(gu_tiling[0], max(16, 1 << (M - 1).bit_length()))
  gu_tiling, dn_tiling = (tm, *gu_tiling[1:]), (tm, *dn_tiling[1:])
  M_pad = -(-M // tm) * tm
  x_MD = x_TD[routing.order_M // K]
  x_MD = jnp.pad(x_MD, ((0, M_pad - M), (0, 0)))
  groups = (routing.group_slots_G, routing.group_sizes_G)
  h_MF = gmm(x_MD, (w_gate_SDF, w_up_SDF), *groups, tiling=gu_tiling, out_dtype=x_TD.dtype,
             swiglu=True, interpret=interpret)
  y_MD = gmm(h_MF, (w_down_SFD,), *groups, tiling=dn_tiling, out_dtype=jnp.float32,
             swiglu=False, interpret=interpret)
  return _reference.combine(y_MD, routing, topk_weights_TK, valid_T, x_TD.dtype)


def expert_dispatch(x_TD: jax.Array, topk_ids_TK: jax.Array, topk_weights_TK: jax.Array,
                    slot_table_E: jax.Array, w_gate_SDF: jax.Array, w_up_SDF: jax.Array,
                    w_down_SFD: jax.Array, *, valid_T: jax.Array | None = None,
                    impl: str | None = None,
                    tiling: _kernel.Tiling | _kernel.TilingFn | None = None) -> jax.Array:
  """SwiGLU MoE experts of one layer, read from the pooled expert-weights buffer by slot.

  y[t] = sum_k topk_weights_TK[t, k] * expert(topk_ids_TK[t, k])(x_TD[t]) with
  expert(e)(x) = (silu(x @ w_gate[s]) * (x @ w_up[s])) @ w_down[s], s = slot_table_E[e].
  Dropless. Only the slots in slot_table_E are read; other slots may hold anything (NaN).
  The hidden activation is rounded to x's dtype before the down matmul; matmuls and the sum
  over k accumulate in f32.

  Args:
    x_TD: [T, D] token activations (float; same dtype as the pools).
    topk_ids_TK: int [T, K] expert ids chosen by the router, in [0, E).
    topk_weights_TK: [T, K] router weights of those choices.
    slot_table_E: int32 [E] pool slot of each expert of this layer; distinct, in [0, S).
    w_gate_SDF: [S, D, F] gate-projection pool (S slots, shared by many models).
    w_up_SDF: [S, D, F] up-projection pool.
    w_down_SFD: [S, F, D] down-projection pool.
    valid_T: optional bool [T]; False marks a padding token: not dispatched (no matmul work),
      output row zero, its ids / weights ignored (may be garbage). None: all valid.
    impl: "pallas" (Mosaic on TPU, Triton on GPU, chosen per lowering platform), "interpret"
      (the TPU kernel in the Pallas interpreter), "reference" (plain jnp, NaN-safe) or None
      (pallas on GPU/TPU, reference elsewhere).
    tiling: None (table keyed by (backend, D, F, dtype), heuristic fallback), a (tm, tk, tn)
      tuple for both grouped matmuls, or a callable (m, k, n) -> (tm, tk, tn).

  Returns:
    [T, D] in x_TD's dtype.
  """
  _check_shapes(x_TD, topk_ids_TK, topk_weights_TK, slot_table_E, w_gate_SDF, w_up_SDF,
                w_down_SFD, valid_T)
  impl = resolve_impl(impl, pallas_backends=("gpu", "tpu"))
  args = (x_TD, topk_ids_TK, topk_weights_TK, slot_table_E, w_gate_SDF, w_up_SDF, w_down_SFD)
  if impl == "reference":
    return _reference.expert_dispatch_reference(*args, valid_T=valid_T)
  if impl == "interpret":
    return _pallas_moe(_kernel.gmm_tpu, "interpret", *args, valid_T, tiling, True)
  # The kernel is picked by the platform being lowered for, not by a device query, so this
  # traces (and cross-lowers) on a machine without the accelerator.
  return jax.lax.platform_dependent(
      *args, valid_T,
      tpu=lambda *a: _pallas_moe(_kernel.gmm_tpu, "tpu", *a, tiling, False),
      cuda=lambda *a: _pallas_moe(_kernel.gmm_gpu, "gpu", *a, tiling, False),
  )


def validate_inputs(topk_ids_TK, topk_weights_TK, slot_table_E, *, num_slots: int,
                    valid_T=None) -> None:
  """Host-side value checks (numpy) for `expert_dispatch`; raises ValueError.

  Args:
    topk_ids_TK: int [T, K] expert ids; must be in [0, E) for valid tokens.
    topk_weights_TK: [T, K] router weights; must be finite for valid tokens.
    slot_table_E: int [E] slots; in [0, num_slots), no two experts on one slot.
    num_slots: S, slots of the pool.
    valid_T: optional bool [T] (padding tokens are not checked).
  """
  ids = np.asarray(topk_ids_TK)
  weights = np.asarray(topk_weights_TK)
  table = np.asarray(slot_table_E)
  if ids.ndim != 2:
    raise ValueError(f"topk_ids_TK must be [T, K], got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"topk_ids_TK must be integer, got {ids.dtype}")
  if weights.shape != ids.shape:
    raise ValueError(f"topk_weights_TK shape {weights.shape} != topk_ids_TK shape {ids.shape}")
  if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
    raise ValueError(f"slot_table_E must be a 1-d integer array, got {table.dtype}{table.shape}")
  E = table.shape[0]
  valid = np.ones(ids.shape[0], bool) if valid_T is None else np.asarray(valid_T, bool)
  if valid.shape != (ids.shape[0],):
    raise ValueError(f"valid_T must be [T={ids.shape[0]}], got shape {valid.shape}")
  bad = np.argwhere(valid[:, None] & ((ids < 0) | (ids >= E)))
  if bad.size:
    t, k = bad[0]
    raise ValueError(f"topk_ids_TK[{t}, {k}] = {ids[t, k]} is not an expert id in [0, {E})")
  bad = np.argwhere(valid[:, None] & ~np.isfinite(weights))
  if bad.size:
    t, k = bad[0]
    raise ValueError(f"topk_weights_TK[{t}, {k}] = {weights[t, k]} is not finite")
  bad = np.flatnonzero((table < 0) | (table >= num_slots))
  if bad.size:
    e = bad[0]
    raise ValueError(f"slot_table_E[{e}] = {table[e]} is not a slot in [0, {num_slots})")
  order = np.argsort(table, kind="stable")
  dup = np.flatnonzero(table[order][1:] == table[order][:-1])
  if dup.size:
    a, b = order[dup[0]], order[dup[0] + 1]
    raise ValueError(f"slot_table_E[{a}] and slot_table_E[{b}] both map to slot {table[a]}")
