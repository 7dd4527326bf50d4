"""The CrossPool policy: attention + KV on 2 KV devices, routed experts on 2 weights devices."""

import jax
import numpy as np
import pytest

from crosspool_jax.engine import Engine, EngineConfig
from tests.engine.test_engine import FAMILIES, MODELS, _references, _workload


def _crosspool(pages, models=FAMILIES, **overrides):
  cfg = dict(kv_policy="crosspool", devices=(0, 1), weight_devices=(2, 3), page_elems=512,
             pages_per_device=pages, token_budget=48, token_buckets=(16, 48), max_batch=4,
             attn_impl="reference", moe_impl="reference", expert_slots_per_device=8,
             expert_policy="lru", micro_batches=2) | overrides
  eng = Engine(EngineConfig(**cfg))
  for i, f in enumerate(models):  # home KV devices alternate: 0, 1, 0, 1
    eng.register_model(f, cfg=MODELS[f][0], params=MODELS[f][1], max_context=48, max_batch=4,
                       group=i % 2)
  eng.start()
  return eng


@pytest.fixture(scope="module")
def crosspool():
  # 2 x 23 usable KV pages (preemption forced); 8 slots per weights device for 64 experts of
  # one shape class (25 % resident: swapping every step).
  return _crosspool(pages=24)


def test_non_expert_weights_live_on_the_home_kv_device_only(crosspool):
  kv_devices = crosspool.executor.kv_devices
  for i, f in enumerate(FAMILIES):
    params = crosspool.executor.models[f].params
    leaves = jax.tree.leaves(params)
    assert {d for x in leaves for d in x.devices()} == {kv_devices[i % 2]}, f
    assert not any("w_gate_EDF" in layer["ffn"] for layer in params["layers"].values())


def test_greedy_equals_reference_with_preemption_and_swapping(crosspool):
  work = _workload(12, seed=1)
  rids = [crosspool.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  out = crosspool.generate_all()
  assert [out[r] for r in rids] == _references(work)
  metrics = crosspool.metrics()
  assert metrics["pools"]["0"]["preemptions"] > 0
  assert metrics["weights_pool"]["misses"] > 0 and metrics["weights_pool"]["evictions"] > 0
  assert metrics["pools"]["0"]["used_pages_now"] == 0


def test_timeline_shows_micro_batches_in_flight_together(crosspool):
  work = _workload(8, seed=5)
  for m, p, n in work:
    crosspool.submit(model_id=m, prompt_ids=p, max_new_tokens=n)
  crosspool.generate_all()
  timeline = crosspool.executor.timeline
  overlap = timeline.overlap()
  kinds = {e["kind"] for e in timeline.events}
  assert {"attention", "merge_router", "transfer_to_weights", "experts",
          "transfer_back"} <= kinds
  assert len({e["micro_batch"] for e in timeline.events}) >= 2
  assert all(e["end"] >= e["start"] for e in timeline.events)
  assert overlap["transfers_concurrent_with_compute"] > 0
  assert 0 < overlap["overlap_fraction"] <= 1


def test_long_request_spreads_over_both_kv_devices():
  eng = _crosspool(pages=8, models=("mixtral",))  # 7 usable pages per KV device
  rng = np.random.default_rng(9)
  prompt = rng.integers(0, 512, size=40).tolist()  # 48 tokens: 6 pages x 2 layers = 12 > 7
  rid = eng.submit(model_id="mixtral", prompt_ids=prompt, max_new_tokens=8)
  eng.step()
  pool = eng.pools[0]
  tables = pool.tables("mixtral", [rid])
  assert set(np.unique(tables[tables > 0] // pool.pages_per_device)) == {0, 1}
  out = eng.generate_all()
  assert out[rid] == _references([("mixtral", prompt, 8)])[0]


@pytest.mark.parametrize("overrides, error", [
    ({"weight_devices": ()}, "the weights pool has no devices"),
    ({"devices": ()}, "at least one KV group device"),
    ({"weight_devices": (1, 2)}, r"devices \[1\] are in both pools"),
    ({"expert_slots_per_device": 1}, "smaller than one layer's top_k=2"),
    ({"micro_batches": 5}, r"micro_batches must be in \[1, max_batch=4\]"),
])
def test_bad_split_fails_at_start_up(overrides, error):
  with pytest.raises(ValueError, match=error):
    _crosspool(pages=24, models=("mixtral",), **overrides)
