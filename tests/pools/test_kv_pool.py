"""KV pool: allocator/virtualizer/planner invariants under random interleavings (hypothesis)."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool, PoolExhaustedError

# Four models of different shapes sharing one page size of 256 elements; "d" caches latent
# rows (one row of 32 per token and layer, no V).
SPECS = (
    KVModelSpec("a", num_layers=2, kv_heads=2, head_dim=16, max_context=40, max_batch=3),  # 4 t/p
    KVModelSpec("b", num_layers=3, kv_heads=1, head_dim=32, max_context=24, max_batch=2),  # 4 t/p
    KVModelSpec("c", num_layers=1, kv_heads=1, head_dim=16, max_context=64, max_batch=4),  # 8 t/p
    KVModelSpec("d", num_layers=2, kv_heads=1, head_dim=32, max_context=40, max_batch=2,
                stores=1),  # 8 t/p
)


class KVPoolMachine(RuleBasedStateMachine):
  """Random register/admit/grow/finish/cancel/preempt/limit sequences over four models."""

  @initialize(policy=st.sampled_from(["shared", "static"]), devices=st.integers(1, 3),
              pages=st.integers(12, 40))
  def setup(self, policy, devices, pages):
    self.pool = KVPool(page_elems=256, pages_per_device=pages, num_devices=devices, policy=policy)
    self.tokens = {}  # request -> tokens the oracle expects it to hold
    self.model_of = {}
    self.next_id = 0
    self.models = []
    for spec in SPECS:
      try:
        self.pool.register_model(spec)
        self.models.append(spec)
      except ValueError as e:  # static reservation did not fit: a clear refusal
        assert policy == "static" and "needs" in str(e)

  def _spec(self, model_id):
    return next(s for s in SPECS if s.model_id == model_id)

  def _expected_pages(self, rid):
    spec = self._spec(self.model_of[rid])
    return math.ceil(self.tokens[rid] / self.pool.page_tokens(spec.model_id))

  @precondition(lambda self: self.models)
  @rule(data=st.data())
  def admit(self, data):
    spec = data.draw(st.sampled_from(self.models))
    rid = f"r{self.next_id}"
    self.next_id += 1
    try:
      self.pool.add_request(spec.model_id, rid)
    except PoolExhaustedError:
      return
    self.tokens[rid], self.model_of[rid] = 0, spec.model_id

  @precondition(lambda self: self.tokens)
  @rule(data=st.data(), preempt=st.booleans())
  def grow(self, data, preempt):
    rid = data.draw(st.sampled_from(sorted(self.tokens)))
    spec = self._spec(self.model_of[rid])
    target = data.draw(st.integers(self.tokens[rid], spec.max_context))
    free_before = self.pool.free_pages(spec.model_id)
    need = self.pool.pages_needed(rid, target)
    assert self.pool.can_grow(rid, target) == (need <= free_before)
    try:
      if preempt:
        victims = self.pool.grow_with_preemption(rid, target)
        for v in victims:
          assert v != rid
          del self.tokens[v]
      else:
        self.pool.grow(rid, target)
    except PoolExhaustedError:
      assert need > free_before
      return
    self.tokens[rid] = target

  @precondition(lambda self: self.tokens)
  @rule(data=st.data())
  def finish_or_cancel(self, data):
    rid = data.draw(st.sampled_from(sorted(self.tokens)))
    self.pool.release(rid)
    del self.tokens[rid]

  @rule(fraction=st.floats(0, 1))
  def change_limit(self, fraction):
    new = int(self.pool.capacity * fraction)
    used_before = self.pool.used_pages
    victims = self.pool.set_limit(new)
    if used_before <= new:
      assert victims == []
    for v in victims:
      del self.tokens[v]
    assert self.pool.used_pages <= new

  @invariant()
  def consistent(self):
    if not hasattr(self, "pool"):
      return
    self.pool.check_invariants()
    assert sorted(self.pool.requests) == sorted(self.tokens)
    for rid in self.tokens:
      assert self.pool.request_pages(rid) == self._expected_pages(rid)
    if self.pool.policy == "shared":
      free_physical = self.pool.capacity - self.pool.used_pages
      assert self.pool.free_pages() == max(0, min(self.pool.limit - self.pool.used_pages,
                                                  free_physical))

  def teardown(self):
    if not hasattr(self, "pool"):
      return
    for rid in list(self.tokens):
      self.pool.release(rid)
    self.pool.check_invariants()
    assert self.pool.used_pages == 0
    self.pool.set_limit(self.pool.capacity)
    assert self.pool.free_pages() == self.pool.capacity  # no leak


TestKVPoolMachine = KVPoolMachine.TestCase
TestKVPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


def _pool(policy="shared", pages=17, devices=1):
  pool = KVPool(page_elems=256, pages_per_device=pages, num_devices=devices, policy=policy)
  for spec in SPECS[:2]:
    pool.register_model(spec)
  return pool


def test_victim_is_most_recently_admitted_other_request():
  pool = KVPool(page_elems=256, pages_per_device=17)  # 16 usable
  pool.register_model(KVModelSpec("a", num_layers=2, kv_heads=2, head_dim=16, max_context=40,
                                  max_batch=4))
  for rid in ("old", "mid", "young", "me"):
    pool.add_request("a", rid)
  pool.grow("old", 8)  # 2 logical x 2 layers = 4 pages
  pool.grow("mid", 8)
  pool.grow("young", 8)
  pool.grow("me", 4)  # 2 pages -> 14 used, 2 free
  victims = pool.grow_with_preemption("me", 16)  # needs 6 more: free 2, "young" frees 4
  assert victims == ["young"]
  assert pool.preemptions == 1
  pool.check_invariants()


def test_latent_and_kv_models_take_pages_of_one_pool():
  pool = KVPool(page_elems=256, pages_per_device=9)  # 8 usable
  assert pool.register_model(SPECS[0]) == 4  # K and V: 256 / (2 x 2 x 16)
  assert pool.register_model(SPECS[3]) == 8  # a latent row of 32: 256 / 32
  pool.add_request("a", "kv")
  pool.add_request("d", "latent")
  pool.grow("kv", 8)  # 2 pages per layer x 2 layers
  pool.grow("latent", 8)  # 1 page per layer x 2 layers
  assert pool.free_pages() == 2
  assert pool.grow_with_preemption("latent", 24) == ["kv"]  # 3 pages per layer: 6 in all
  pool.check_invariants()


def test_static_policy_quota_and_isolation():
  pool = KVPool(page_elems=256, pages_per_device=80, policy="static")
  pool.register_model(SPECS[0])  # reserves 2 layers x 10 pages x 3 = 60
  with pytest.raises(ValueError, match="static policy: model 'b' needs 36 pages"):
    pool.register_model(SPECS[1])
  assert pool.free_pages("a") == 60


def test_limit_lowering_takes_free_pages_then_preempts():
  pool = _pool(pages=17)
  pool.add_request("a", "x")
  pool.add_request("b", "y")
  pool.grow("x", 8)  # 4 pages
  pool.grow("y", 4)  # 3 pages
  assert pool.set_limit(7) == []  # only free pages go
  assert pool.free_pages() == 0
  assert pool.set_limit(5) == ["y"]  # the younger one
  pool.check_invariants()
  with pytest.raises(ValueError, match="limit must be in"):
    pool.set_limit(pool.capacity + 1)


def test_sequence_spreads_over_devices_and_local_tables_partition_it():
  pool = KVPool(page_elems=256, pages_per_device=5, num_devices=2)  # 4 usable each
  pool.register_model(KVModelSpec("m", num_layers=1, kv_heads=2, head_dim=16, max_context=32,
                                  max_batch=1))
  pool.add_request("m", "long")
  pool.grow("long", 28)  # 7 pages > 4 on one device
  tables = pool.tables("m", ["long"])
  devices = tables[tables > 0] // 5
  assert set(devices.tolist()) == {0, 1}
  local0, local1 = pool.local_tables(tables, 0), pool.local_tables(tables, 1)
  assert ((local0 > 0) ^ (local1 > 0))[:, :, :7].all()  # every page on exactly one device
  assert (local0[:, :, 7:] == 0).all() and (local1[:, :, 7:] == 0).all()


def test_pages_come_from_the_home_device_first_then_spill():
  pool = KVPool(page_elems=256, pages_per_device=5, num_devices=3)  # 4 usable each
  spec = dict(num_layers=1, kv_heads=2, head_dim=16, max_context=64, max_batch=2)
  pool.register_model(KVModelSpec("home2", **spec), home_device=2)
  pool.register_model(KVModelSpec("free", **spec))
  pool.add_request("home2", "a")
  pool.grow("a", 12)  # 3 pages: all on device 2, though devices 0 and 1 have as many free
  assert set((pool.tables("home2", ["a"]) // 5)[0, 0, :3].tolist()) == {2}
  pool.grow("a", 24)  # 3 more: device 2 has 1 left, the rest spills
  devices = (pool.tables("home2", ["a"]) // 5)[0, 0, :6].tolist()
  assert devices[:4] == [2, 2, 2, 2] and set(devices[4:]) <= {0, 1}
  pool.add_request("free", "b")
  pool.grow("b", 4)  # no home: the device with most free pages
  assert (pool.tables("free", ["b"]) // 5)[0, 0, 0] in {0, 1}
  pool.check_invariants()
  with pytest.raises(ValueError, match="home_device 3 out of range"):
    pool.register_model(KVModelSpec("bad", **spec), home_device=3)


def test_slot_mapping_points_into_own_pages():
  pool = _pool(pages=17)
  pool.add_request("a", "x")
  pool.grow("x", 10)
  tables = pool.tables("a", ["x"])
  positions = np.array([0, 5, 9, -1])
  slots = pool.slot_mapping(tables, np.zeros(4, np.int64), positions, 4, device=0)
  pages = slots // 4
  np.testing.assert_array_equal(pages[:, :3], tables[:, 0, [0, 1, 2]])
  np.testing.assert_array_equal(slots[:, :3] % 4, [[0, 1, 1]] * 2)
  assert (slots[:, 3] == 0).all()  # padding -> null page


def test_bad_input_is_named():
  pool = _pool()
  with pytest.raises(ValueError, match="already registered"):
    pool.register_model(SPECS[0])
  with pytest.raises(ValueError, match=r"stores \* kv_heads \* head_dim = 2 \* 3 \* 16"):
    pool.register_model(KVModelSpec("z", 1, kv_heads=3, head_dim=16, max_context=8,
                                    max_batch=1))
  with pytest.raises(ValueError, match="= 1 \\* 1 \\* 48 = 48"):  # a latent row of 48
    pool.register_model(KVModelSpec("y", 1, kv_heads=1, head_dim=48, max_context=8,
                                    max_batch=1, stores=1))
  with pytest.raises(ValueError, match="stores must be 1 .latent rows. or 2 .K and V., got 3"):
    KVModelSpec("x", 1, kv_heads=1, head_dim=16, max_context=8, max_batch=1, stores=3)
  with pytest.raises(KeyError, match="unknown model 'nope'"):
    pool.add_request("nope", "r")
  pool.add_request("a", "r")
  with pytest.raises(ValueError, match="already exists"):
    pool.add_request("a", "r")
  with pytest.raises(ValueError, match="exceed model 'a' max_context 40"):
    pool.grow("r", 41)
  with pytest.raises(ValueError, match="policy must be one of"):
    KVPool(page_elems=256, pages_per_device=4, policy="lru")
