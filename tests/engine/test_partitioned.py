"""The crosspool_partitioned policy: CrossPool with expert slots of each model's own.

Its weights pool against the consolidated one on the same accesses (one model evicts another's
experts only under consolidation), and an engine serving with it against the reference."""

import numpy as np
import pytest

from crosspool_jax.engine.policies import get_policy
from crosspool_jax.pools.weights_pool import ExpertModelSpec
from tests.engine.test_crosspool import _crosspool
from tests.engine.test_engine import MODELS, _references

PAIR = ("mixtral", "qwen3_moe")  # one expert shape class; 2 MoE layers of 8 experts each


def _weights_pool(policy, slots_per_model):
  """The policy's own host weights pool on one weights device, both models registered, with
  memory for 2 x `slots_per_model` slots either way."""
  specs = [ExpertModelSpec.from_config(m, MODELS[m][0]) for m in PAIR]
  pool = get_policy(policy).new_weights_pool(
      device_bytes=2 * slots_per_model * specs[0].shape_class.expert_bytes, num_devices=1,
      expert_policy="lru")
  slots = 2 * slots_per_model if policy == "crosspool" else slots_per_model
  for spec in specs:
    pool.register_model(spec, slots_per_device=slots)
  return pool


def _random_accesses(pool, rng, n):
  """n accesses (a random model, layer and 2-8 of its experts); per access the evicted keys."""
  out = []
  for _ in range(n):
    model = PAIR[int(rng.integers(2))]
    experts = rng.choice(8, size=int(rng.integers(2, 9)), replace=False)
    plan = pool.access(model, int(rng.integers(2)), experts.tolist())
    out.append((model, plan.evicted))
  pool.check_invariants()
  return out


@pytest.mark.parametrize("seed", range(3))
def test_one_models_accesses_never_evict_anothers_experts_when_partitioned(seed):
  # 12 slots per model (24 in all) for 16 experts per model: both pools must swap.
  consolidated = _weights_pool("crosspool", 12)
  partitioned = _weights_pool("crosspool_partitioned", 12)
  assert len(consolidated.classes) == 1 and len(partitioned.classes) == 2
  rng = np.random.default_rng(seed)
  accesses = _random_accesses(consolidated, rng, 200)
  assert any(key[0] != model for model, evicted in accesses for key in evicted)
  rng = np.random.default_rng(seed)
  accesses = _random_accesses(partitioned, rng, 200)
  assert sum(len(evicted) for _, evicted in accesses) > 0  # it swaps, within each model
  assert all(key[0] == model for model, evicted in accesses for key in evicted)


@pytest.fixture(scope="module")
def partitioned():
  # One weights device: each model's 16 experts in its own 8 slots (swapping every step).
  return _crosspool(pages=24, models=PAIR, kv_policy="crosspool_partitioned",
                    weight_devices=(2,), expert_slots_per_device=8)


def _work(model, n, seed):
  rng = np.random.default_rng(seed)
  return [(model, rng.integers(0, 512, size=int(rng.integers(2, 20))).tolist(), 6)
          for _ in range(n)]


def _serve(engine, work):
  rids = [engine.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  out = engine.generate_all()
  assert [out[r] for r in rids] == _references(work)


def test_greedy_equals_reference_and_models_keep_their_experts(partitioned):
  pool = partitioned.weights_pool.pool
  assert sorted(c.shape.owner for c in pool.classes) == sorted(PAIR)
  _serve(partitioned, _work("mixtral", 4, seed=1))
  mixtral_resident = {k for k in pool.resident_keys() if k[0] == "mixtral"}
  evictions = pool.stats.evictions
  _serve(partitioned, _work("qwen3_moe", 4, seed=2))
  assert pool.stats.evictions > evictions  # qwen3_moe swapped, its own experts only
  assert {k for k in pool.resident_keys() if k[0] == "mixtral"} == mixtral_resident
  events = len(partitioned.executor.timeline.events)
  _serve(partitioned, _work("mixtral", 3, seed=3) + _work("qwen3_moe", 3, seed=4))
  calls = [e for e in partitioned.executor.timeline.events[events:] if e["kind"] == "experts"]
  assert calls and all(len(set(e["models"])) == 1 for e in calls)  # no call serves two models
  # A model's micro-batches are in different phases of the ping-pong: a call each.
  assert all(e["members"] == [e["micro_batch"]] for e in calls)
  assert len({e["micro_batch"] for e in calls}) > 1
  pool.check_invariants()


def test_a_model_arriving_after_start_finds_no_slots_of_its_own(partitioned):
  cfg, params = MODELS["olmoe"]
  with pytest.raises(ValueError, match="there is no room for a new one"):
    partitioned.register_model("olmoe", cfg=cfg, params=params, max_context=48, max_batch=4)
  assert "olmoe" not in partitioned.weights_pool.pool.models
  with pytest.raises(ValueError, match="unknown model_id 'olmoe'"):
    partitioned.kv_pool("olmoe")
  _serve(partitioned, _work("mixtral", 2, seed=5))
