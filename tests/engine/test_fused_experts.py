"""Fused expert calls of the CrossPool executor, piece by piece (the engine tests run them end
to end in test_crosspool.py): a member's expert message carries its arrays bit for bit; members
packed into one call through slot ids and the identity slot table give each member's own
call's result; residency of a fused group (`can_hold`, `access(protect=...)`, `access_many`)."""

import jax
import numpy as np
import pytest

from crosspool_jax.engine.executors.crosspool import ExpertMessage, _stage, _unstage
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.models.stages import routed_experts
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool
from crosspool_jax.pools.weights_pool import (
    ExpertModelSpec,
    PoolExhaustedError,
    ShapeClass,
    WeightsPool,
)

D, F, S = 16, 8, 8


def _member(rng, t, valid, e, k, table):
  """A member micro-batch: h, ids, weights, valid (padding rows: garbage ids, NaN weights)."""
  h = rng.standard_normal((t, D)).astype(np.float32)
  ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int32)
  w = rng.random((t, k)).astype(np.float32)
  v = np.arange(t) < valid
  ids[~v], w[~v] = 99, np.nan
  return h, ids, w, v, np.asarray(table, np.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_message_round_trip_is_bit_exact(dtype):
  rng = np.random.default_rng(1)
  h, ids, w, v, _ = _member(rng, 5, 3, 8, 3, range(8))  # padding rows: id 99, NaN weights
  h = jax.numpy.asarray(h).astype(dtype)
  message = ExpertMessage(D, 3, dtype)
  msg = jax.jit(message.pack)(h, ids, w, v)
  assert msg.dtype == np.uint8
  assert msg.shape == (5, D * np.dtype(h.dtype).itemsize + 2 * 4 * 3 + 1) == (5, message.row_bytes)
  got = jax.jit(message.unpack)(msg)
  for g, want in zip(got, (h, ids, w, v), strict=True):
    assert g.dtype == np.asarray(want).dtype and g.shape == np.shape(want)
    np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(want).view(np.uint8))
  np.testing.assert_array_equal(message.host_ids(np.asarray(msg)), ids)
  with pytest.raises(ValueError, match="expert message"):
    message.pack(h, ids[:, :2], w[:, :2], v)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_fused_call_equals_each_members_own_call(impl):
  rng = np.random.default_rng(0)
  gate, up = (rng.standard_normal((S, D, F)).astype(np.float32) for _ in range(2))
  down = rng.standard_normal((S, F, D)).astype(np.float32)
  for w in (gate, up, down):
    w[4] = np.nan  # a slot no member owns: must never be read
  buffers = tuple(jax.numpy.asarray(w) for w in (gate, up, down))
  # Two models of one class: E=4, top-2 and E=3, top-1 (padded to K_f=2 with weight 0).
  members = [_member(rng, 6, 4, 4, 2, [5, 1, 3, 0]), _member(rng, 4, 3, 3, 1, [2, 6, 7])]
  fused = (np.zeros((16, D), np.float32), np.zeros((16, 2), np.int32),
           np.zeros((16, 2), np.float32), np.zeros(16, bool))
  offsets = [0, 4]
  tables = np.zeros((2, 4), np.int32)  # one slot-table row per member's layer
  used = np.zeros((1, 2, 4), bool)  # [steps of the run, rows, experts]
  messages = [ExpertMessage(D, m[1].shape[1], "float32") for m in members]
  msgs = [message.pack(*m[:4]) for message, m in zip(messages, members, strict=True)]
  for row, (m, off) in enumerate(zip(members, offsets, strict=True)):
    tables[row, :m[4].size] = m[4]
    *fused, used = _stage(*fused, used, msgs[row], tables, np.int32(row), np.int32(off),
                          np.int32(0), message=messages[row])
  assert int(np.asarray(fused[3]).sum()) == 7  # 4 + 3 valid rows packed, the rest padding
  for row, (_, ids, _, v, _) in enumerate(members):  # the experts its valid tokens chose
    assert set(np.flatnonzero(np.asarray(used)[0, row])) == set(ids[v].ravel())
  y_fused = routed_experts(*fused, np.arange(S, dtype=np.int32), *buffers, impl=impl)
  for m, msg, message, off in zip(members, msgs, messages, offsets, strict=True):
    h, ids, w, v, table = m
    got = np.asarray(_unstage(y_fused, msg, np.int32(off), message=message))
    want = np.asarray(routed_experts(h, ids, w, v, table, *buffers, impl=impl))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got[~v] == 0).all()


def _host_pool(slots=4):
  pool = WeightsPool(device_bytes=1 << 20, policy="lru")
  shape = ShapeClass(D, F, "float32")
  for m in ("a", "b"):
    pool.register_model(ExpertModelSpec(m, shape, 4, 2, (0,)), slots_per_device=slots)
  return pool


def test_protected_experts_of_other_members_are_never_victims():
  pool = _host_pool()
  pool.access("b", 0, [0, 1])  # b's are the least recently used ...
  pool.access("a", 0, [0, 1])
  protect = [("b", 0, 0), ("b", 0, 1)]
  assert pool.can_hold([*protect, ("a", 0, 2), ("a", 0, 3)])
  assert not pool.can_hold([*protect, ("a", 0, 1), ("a", 0, 2), ("a", 0, 3)])
  plan = pool.access("a", 0, [2, 3], protect=protect)  # ... yet a's own old experts go
  assert sorted(plan.evicted) == [("a", 0, 0), ("a", 0, 1)]
  assert all(pool.residency(k) is not None for k in protect)
  with pytest.raises(PoolExhaustedError):
    pool.access("a", 0, [0], protect=[*protect, ("a", 0, 2), ("a", 0, 3)])
  pool.check_invariants()
  pool.pin("b", 0, [0])  # a pinned slot outside the set counts against it
  assert not pool.can_hold([("a", 0, 0), ("a", 0, 1), ("a", 0, 2), ("a", 0, 3)])
  with pytest.raises(ValueError, match="partitions"):
    pool2 = WeightsPool(device_bytes=1 << 20, num_devices=2, policy="lru")
    pool2.register_model(ExpertModelSpec("a", ShapeClass(D, F, "float32"), 4, 2, (0, 1)),
                         slots_per_device=4)
    pool2.can_hold([("a", 0, 0), ("a", 1, 0)])  # layers homed on devices 0 and 1


def test_access_many_loads_every_member_in_one_update():
  cfg = tiny_config("mixtral")  # E=8 per layer, D=64, F=32
  wpool = DeviceWeightsPool(WeightsPool(device_bytes=1 << 30, policy="lru"),
                            devices=jax.devices()[:1])
  params = {m: init_params(cfg, seed=i) for i, m in enumerate(("a", "b"))}
  for i, (m, p) in enumerate(params.items()):
    wpool.register(m, cfg, p, slots_per_device=8 if i == 0 else None)
  calls = wpool.pool.stats.swap_calls
  wpool.access_many([("a", 0, [0, 1, 2, 3]), ("b", 0, [4, 5, 6, 7])])
  assert wpool.pool.stats.swap_calls == calls + 1
  wpool.access_many([("b", 0, [4, 5]), ("a", 0, [6, 7])])  # full: 2 loads, 2 evictions
  assert all(wpool.pool.residency(("b", 0, e)) for e in (4, 5, 6, 7))
  wpool.pool.check_invariants()
  gate = np.asarray(wpool.buffers(0, 0)[0])
  for m in ("a", "b"):
    table = wpool.pool.slot_table(m, 0)
    for e in np.flatnonzero(wpool.pool.resident_mask(m, 0)):
      np.testing.assert_array_equal(gate[table[e]],
                                    np.asarray(params[m]["layers"][0]["ffn"]["w_gate_EDF"][e]))
