"""Weights pool, host side: registration errors, invariants under random sequences (hypothesis),
Belady's MIN by hand and as a bound, trace JSONL and replay."""

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from crosspool_jax.pools.expert_policies import POLICIES, belady_min, make_policy
from crosspool_jax.pools.expert_trace import (
    TraceEvent,
    belady_stats,
    prediction_accuracy,
    read_jsonl,
    replay,
    write_jsonl,
)
from crosspool_jax.pools.weights_pool import (
    ExpertModelSpec,
    PoolExhaustedError,
    ShapeClass,
    WeightsPool,
)

BIG = ShapeClass(64, 32, "float32")  # 24 KiB per expert
SMALL = ShapeClass(16, 8, "float32")  # 1.5 KiB per expert
DEMAND_POLICIES = ("lru", "lfu", "activation_aware")


def _spec(model_id, shape=SMALL, experts=4, top_k=2, layers=(0, 1)):
  return ExpertModelSpec(model_id, shape, experts, top_k, tuple(layers))


def _snapshot(pool: WeightsPool):
  return (sorted(pool.models), [(c.shape, c.slots_per_device) for c in pool.classes],
          dict(pool._residency), {k: v.copy() for k, v in pool._tables.items()},
          dict(pool._home), pool.stats.to_dict(), pool.free_bytes(), pool.clock)


def _same(a, b):
  assert a[:3] == b[:3] and a[4:] == b[4:]
  assert a[3].keys() == b[3].keys() and all((a[3][k] == b[3][k]).all() for k in a[3])


# --- registration and bad input ----------------------------------------------------------------


def test_models_of_one_shape_share_a_class_and_new_shapes_get_one():
  pool = WeightsPool(device_bytes=10 * BIG.expert_bytes + 8 * SMALL.expert_bytes, num_devices=2)
  assert pool.register_model(_spec("a", BIG, 8, 2), slots_per_device=8) == 0
  assert pool.register_model(_spec("b", BIG, 8, 2)) == 0  # same architecture: same slots
  assert pool.register_model(_spec("c", SMALL), slots_per_device=8) == 1
  assert len(pool.classes) == 2 and pool.free_bytes() == 2 * BIG.expert_bytes
  # Layers of a model alternate home devices; a layer's slot table is injective and in range.
  assert {pool.home_device("a", 0), pool.home_device("a", 1)} == {0, 1}
  pool.access("a", 1, [3, 5])
  table = pool.slot_table("a", 1)
  assert sorted(np.unique(table)) == sorted(table) and ((0 <= table) & (table < 8)).all()
  assert pool.residency(("a", 1, 3)) == (pool.home_device("a", 1), int(table[3]))
  pool.check_invariants()


@pytest.mark.parametrize("case", ["twice", "no_class_no_room", "no_class_no_slots",
                                  "slots_below_top_k", "slots_below_experts", "slots_mismatch",
                                  "pin_all_too_big"])
def test_bad_registration_is_refused_and_the_pool_is_unchanged(case):
  policy = "pin_all" if case == "pin_all_too_big" else "lru"
  pool = WeightsPool(device_bytes=8 * BIG.expert_bytes, policy=policy)
  pool.register_model(_spec("a", BIG, 4, 2, layers=(0,)), slots_per_device=8)
  if policy == "lru":
    pool.access("a", 0, [1, 2])
  before = _snapshot(pool)
  spec, kwargs, match = {
      "twice": (_spec("a", BIG, 4, 2), {}, "already registered"),
      "no_class_no_room": (_spec("b", SMALL), {"slots_per_device": 4}, "no room for a new"),
      "no_class_no_slots": (_spec("b", SMALL), {}, "matches no shape class"),
      "slots_below_top_k": (_spec("b", BIG, 16, 9), {}, "smaller than one layer's top_k=9"),
      "slots_below_experts": (_spec("b", BIG, 16, 2), {}, "num_experts=16"),
      "slots_mismatch": (_spec("b", BIG, 4, 2), {"slots_per_device": 6}, "already has 8"),
      "pin_all_too_big": (_spec("b", BIG, 4, 2, layers=(0, 1)), {}, "pin_all policy"),
  }[case]
  with pytest.raises(ValueError, match=match):
    pool.register_model(spec, **kwargs)
  _same(_snapshot(pool), before)
  pool.check_invariants()


def test_a_layer_needing_more_than_the_evictable_slots_is_refused_unchanged():
  pool = WeightsPool(device_bytes=1 << 20)
  pool.register_model(_spec("a", experts=4, top_k=2), slots_per_device=4)
  pool.pin("a", 0, [0, 1])
  pool.access("a", 1, [0])
  before = _snapshot(pool)
  with pytest.raises(PoolExhaustedError, match="needs 3 more experts"):
    pool.access("a", 1, [1, 2, 3])
  _same(_snapshot(pool), before)
  with pytest.raises(ValueError, match="not in"):
    pool.access("a", 1, [4])
  with pytest.raises(ValueError, match="not a MoE layer"):
    pool.access("a", 2, [0])
  with pytest.raises(KeyError, match="unknown model"):
    pool.access("zz", 0, [0])
  _same(_snapshot(pool), before)


def test_pin_all_pins_everything_and_never_misses():
  pool = WeightsPool(device_bytes=1 << 20, policy="pin_all")
  pool.register_model(_spec("a"), slots_per_device=8)
  assert len(pool.resident_keys()) == 8 and all(pool.is_pinned(k) for k in pool.resident_keys())
  for layer in (0, 1):
    assert pool.access("a", layer, [0, 3]).loads == []
  assert pool.stats.misses == 0 and pool.stats.hit_rate == 1.0
  pool.check_invariants()


def test_prefetch_is_best_effort_and_protects_the_running_layer():
  pool = WeightsPool(device_bytes=1 << 20, policy="activation_aware")
  pool.register_model(_spec("a"), slots_per_device=4)
  pool.access("a", 0, [0, 1, 2])
  plan = pool.prefetch("a", 1, [0, 1, 2, 3], protect=[("a", 0, e) for e in (0, 1, 2)])
  assert len(plan.loads) == 1 and plan.prefetch  # one free slot, the rest protected
  assert all(pool.residency(("a", 0, e)) for e in (0, 1, 2))
  pool.access("a", 1, [0])
  assert pool.stats.prefetch_hits == 1 and pool.stats.prefetch_loads == 1
  assert pool.stats.to_dict()["prefetch_accuracy"] == 1.0
  pool.check_invariants()


def test_prefetch_accuracy_counts_prefetched_experts_read_before_eviction():
  pool = WeightsPool(device_bytes=1 << 20, policy="activation_aware")
  pool.register_model(_spec("a"), slots_per_device=4)
  pool.access("a", 0, [0, 1])
  pool.prefetch("a", 1, [2, 3], protect=[("a", 0, 0), ("a", 0, 1)])  # the two free slots
  pool.access("a", 1, [2])  # reads one of them: a prefetch hit
  pool.access("a", 1, [2])  # a hit, not a second prefetch hit
  assert (pool.stats.prefetch_loads, pool.stats.prefetch_hits) == (2, 1)
  assert pool.stats.prefetch_accuracy == 0.5


def test_prediction_accuracy_by_hand():
  events = [TraceEvent(0, "a", 0, (0, 1), 1, (1, 2)),  # layer 1 uses {1, 3}: 1 of 2 right
            TraceEvent(0, "a", 1, (1, 3)),
            TraceEvent(0, "b", 0, (2,), 2, (0, 1, 3)),  # layer 2 uses {0, 3}: 2 of 3 right
            TraceEvent(0, "b", 2, (0, 3)),
            TraceEvent(1, "a", 0, (2, 3), None, None)]  # no prediction: not counted
  acc = prediction_accuracy(events, {"a": 4, "b": 8})
  assert (acc["predictions"], acc["predicted"], acc["used"], acc["correct"]) == (2, 5, 4, 3)
  assert acc["precision"] == pytest.approx(3 / 5) and acc["recall"] == pytest.approx(3 / 4)
  # a random pick of 2 of a's 4 experts hits 2/4 of the time; of 3 of b's 8, 2/8
  assert acc["chance_precision"] == pytest.approx((2 * 2 / 4 + 3 * 2 / 8) / 5)
  with pytest.raises(ValueError, match="predicts layer 1, which has no event"):
    prediction_accuracy(events[:1], {"a": 4})


# --- invariants under random sequences -------------------------------------------------------

SPECS = (
    _spec("a", SMALL, 4, 2, (0, 1)),
    _spec("b", SMALL, 4, 1, (0, 2)),  # a fine-tune of the same shape: shares a's slots
    _spec("c", BIG, 3, 2, (1,)),  # another shape class
)


class WeightsPoolMachine(RuleBasedStateMachine):
  """Random register / access / prefetch / pin / unpin sequences under every policy."""

  @initialize(policy=st.sampled_from(sorted(POLICIES)), devices=st.integers(1, 2),
              slots=st.integers(4, 9))
  def setup(self, policy, devices, slots):
    budget = slots * SMALL.expert_bytes + 5 * BIG.expert_bytes
    self.pool = WeightsPool(device_bytes=budget, num_devices=devices, policy=policy)
    self.models = []
    self.pinned = set()
    for spec in SPECS:
      before = _snapshot(self.pool)
      try:
        self.pool.register_model(spec, slots_per_device=slots if spec.shape_class == SMALL
                                 else 5)
        self.models.append(spec)
      except ValueError as e:  # pin_all that does not fit: a clear refusal, nothing changed
        assert policy == "pin_all" and "pin_all" in str(e)
        _same(_snapshot(self.pool), before)
    if policy == "pin_all":
      self.pinned = set(self.pool.resident_keys())

  def _draw_layer(self, data):
    spec = data.draw(st.sampled_from(self.models))
    layer = data.draw(st.sampled_from(spec.moe_layers))
    experts = data.draw(st.lists(st.integers(0, spec.num_experts - 1), min_size=1,
                                 max_size=spec.num_experts))
    return spec, layer, experts

  @precondition(lambda self: self.models)
  @rule(data=st.data())
  def access(self, data):
    spec, layer, experts = self._draw_layer(data)
    before = _snapshot(self.pool)
    hits = self.pool.stats.hits
    resident_before = {e for e in experts if self.pool.residency((spec.model_id, layer, e))}
    try:
      plan = self.pool.access(spec.model_id, layer, experts)
    except PoolExhaustedError:
      _same(_snapshot(self.pool), before)
      return
    assert all(self.pool.residency((spec.model_id, layer, e)) for e in experts)
    assert self.pool.stats.hits - hits == len(resident_before)
    assert {k[2] for k, _, _ in plan.loads} == set(experts) - resident_before
    assert not set(plan.evicted) & {(spec.model_id, layer, e) for e in experts}

  @precondition(lambda self: self.models)
  @rule(data=st.data())
  def prefetch(self, data):
    spec, layer, experts = self._draw_layer(data)
    other = data.draw(st.sampled_from(spec.moe_layers))
    protect = [k for k in self.pool.resident_keys() if k[0] == spec.model_id and k[1] == other]
    plan = self.pool.prefetch(spec.model_id, layer, experts, protect=protect)
    assert all(self.pool.residency(k) for k in protect)
    assert not set(plan.evicted) & set(protect)

  @precondition(lambda self: self.models)
  @rule(data=st.data())
  def pin(self, data):
    spec, layer, experts = self._draw_layer(data)
    try:
      self.pool.pin(spec.model_id, layer, experts)
    except PoolExhaustedError:
      return
    self.pinned |= {(spec.model_id, layer, e) for e in experts}

  @precondition(lambda self: self.pinned and self.pool.policy.name != "pin_all")
  @rule(data=st.data())
  def unpin(self, data):
    key = data.draw(st.sampled_from(sorted(self.pinned)))
    self.pool.unpin(*key[:2], [key[2]])
    self.pinned.discard(key)

  @invariant()
  def consistent(self):
    self.pool.check_invariants()
    for key in self.pinned:
      assert self.pool.residency(key) is not None and self.pool.is_pinned(key), key
    # No slot holds two experts, and the kernel's slot tables are injective and in range.
    for spec in self.models:
      for layer in spec.moe_layers:
        table = self.pool.slot_table(spec.model_id, layer)
        slots = self.pool.classes[self.pool.model_class(spec.model_id)].slots_per_device
        assert np.unique(table).size == table.size and (table >= 0).all()
        assert (table < slots).all()


TestWeightsPoolMachine = WeightsPoolMachine.TestCase
TestWeightsPoolMachine.settings = settings(max_examples=40, stateful_step_count=25,
                                           deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])


# --- Belady's MIN ----------------------------------------------------------------------------

A, B, C, D = ("m", 0, 0), ("m", 0, 1), ("m", 1, 0), ("m", 1, 1)
HAND_TRACE = [A, B, C, A, D, A, B, C]


def test_belady_on_a_hand_made_trace():
  # Capacity 2. MIN: A- B- C-(evict B, next use 6 > A's 3) A+ D-(evict C: 7 > A's 5) A+ B- C-.
  assert belady_min(HAND_TRACE, 2) == (2, 6)
  # LRU on the same trace: only the A at index 5 hits.
  assert belady_min(HAND_TRACE, 4) == (4, 4)  # compulsory misses only
  assert belady_min([A, A, A], 1) == (2, 1)
  events = [TraceEvent(i, *k[:2], (k[2],)) for i, k in enumerate(HAND_TRACE)]
  for policy, hits in (("lru", 1), ("lfu", 1)):
    pool = WeightsPool(device_bytes=1 << 20, policy=policy)
    pool.register_model(_spec("m", experts=2, top_k=1), slots_per_device=2)
    assert belady_stats(events, pool) == {"accesses": 8, "hits": 2, "misses": 6,
                                          "hit_rate": 0.25}
    assert replay(events, pool).hits == hits
  with pytest.raises(ValueError, match="capacity"):
    belady_min(HAND_TRACE, 0)


def _events_strategy():
  event = st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([0, 1]),
                    st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
                    st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True))
  return st.lists(event, min_size=1, max_size=60)


def _pool(policy, slots, devices):
  pool = WeightsPool(device_bytes=1 << 20, num_devices=devices, policy=make_policy(policy))
  pool.register_model(_spec("a", experts=4, top_k=2), slots_per_device=slots)
  pool.register_model(_spec("b", experts=4, top_k=2))
  return pool


@settings(max_examples=60, deadline=None)
@given(raw=_events_strategy(), slots=st.integers(4, 10), devices=st.integers(1, 2))
def test_no_policy_beats_belady_on_random_traces(raw, slots, devices):
  events = [TraceEvent(i, m, layer, tuple(sorted(ex)), 1 - layer if layer == 0 else None,
                       tuple(sorted(pred)) if layer == 0 else None)
            for i, (m, layer, ex, pred) in enumerate(raw)]
  bound = belady_stats(events, _pool("lru", slots, devices))
  for policy in DEMAND_POLICIES:
    demand = replay(events, _pool(policy, slots, devices), prefetch=False)
    assert demand.hits <= bound["hits"], policy
    assert demand.accesses == bound["accesses"]
  # With prefetching, hits may exceed MIN's, but no policy loads fewer experts than MIN misses.
  pre = replay(events, _pool("activation_aware", slots, devices), prefetch=True)
  assert pre.loads >= bound["misses"]


# --- traces ----------------------------------------------------------------------------------


def test_trace_jsonl_round_trip_and_bad_lines(tmp_path):
  events = [TraceEvent(0, "a", 0, (1, 3), 1, (0, 2)), TraceEvent(0, "a", 1, (0,)),
            TraceEvent(1, "b", 2, (2, 3), None, None)]
  path = tmp_path / "t.jsonl"
  write_jsonl(events, path)
  assert read_jsonl(path) == events
  path.write_text(path.read_text() + '\n{"step": 2, "model": "a"}\n')
  with pytest.raises(ValueError, match=r"t.jsonl:5: bad trace line.*lacks"):
    read_jsonl(path)


def test_replay_is_deterministic():
  events = [TraceEvent(i, "ab"[i % 2], i % 2, (i % 4, (i + 1) % 4), None, None)
            for i in range(40)]
  stats = [replay(events, _pool(p, 4, 1)).to_dict() for p in ("lru", "lru")]
  assert stats[0] == stats[1] and stats[0]["accesses"] == 80
  a, b = _pool("lfu", 4, 1), copy.deepcopy(_pool("lfu", 4, 1))
  assert replay(events, a).to_dict() == replay(events, b).to_dict()


class _Scanned:
  """A policy with its victim priority hidden, so the pool scans every slot for a victim."""

  has_priority = False

  def __init__(self, policy):
    self._policy = policy

  def __getattr__(self, name):
    return getattr(self._policy, name)


@settings(max_examples=40, deadline=None)
@given(raw=_events_strategy(), slots=st.integers(4, 10), devices=st.integers(1, 2),
       limit=st.integers(4, 10))
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_victim_heap_evicts_as_the_scan_does(policy, raw, slots, devices, limit):
  # The oracle: the same trace through a pool that scans the slots for each victim
  # (choose_victim over every evictable expert). Plans, residency and tables must agree.
  pools = []
  for wrap in (lambda p: p, _Scanned):
    pool = _pool(policy, slots, devices)
    pool.policy = wrap(pool.policy)
    pools.append(pool)
  for i, (m, layer, ex, pred) in enumerate(raw):
    plans = []
    for pool in pools:
      if i == len(raw) // 2:  # a lower slot limit evicts by the policy too
        pool.set_slot_limit(0, min(limit, slots))
      plan = pool.access(m, layer, ex)
      plans.append((plan.loads, plan.evicted))
      if layer == 0:
        plan = pool.prefetch(m, 1, pred, protect={(m, 0, e) for e in ex})
        plans.append((plan.loads, plan.evicted))
    assert plans[:len(plans) // 2] == plans[len(plans) // 2:]
  heap, scan = pools
  assert heap._residency == scan._residency
  heap.check_invariants()


@pytest.mark.parametrize("policy", ["lru", "lfu", "activation_aware"])
def test_a_model_re_registered_in_another_class_leaves_no_victim_behind(policy):
  # m's experts fill the small class, m leaves and comes back with big experts (another class,
  # more slots), its old keys now resident at slots the small class does not have. Evictions
  # in the small class, and a protect set naming m's big-class experts, must not mistake them
  # for its own (before: an IndexError from the stale heap entries and from the room check).
  pool = WeightsPool(device_bytes=1 << 22, policy=policy)
  pool.register_model(_spec("m", experts=4, layers=(0,)), slots_per_device=4)
  pool.register_model(_spec("t", experts=4, layers=(0, 1)))
  pool.access("m", 0, [0, 1, 2, 3])
  pool.unregister_model("m")
  pool.register_model(_spec("m", shape=BIG, experts=16, top_k=2, layers=(0,)),
                      slots_per_device=16)
  pool.access("m", 0, list(range(4, 14)))  # slots 0-9 of the big class
  pool.access("m", 0, [0, 1, 2, 3])  # slots 10-13: beyond the small class's 4
  pool.access("t", 0, [0, 1, 2, 3])
  big = {("m", 0, e) for e in range(4)}
  plan = pool.access("t", 1, [0, 1], protect=big)  # evicts two of t's layer-0 experts
  assert len(plan.evicted) == 2 and {k[0] for k in plan.evicted} == {"t"}
  assert big <= set(pool.resident_keys())
  plan = pool.access("t", 1, [2, 3])  # no protect set: the victims come from the heap alone
  assert {k[0] for k in plan.evicted} == {"t"} and big <= set(pool.resident_keys())
  pool.check_invariants()
