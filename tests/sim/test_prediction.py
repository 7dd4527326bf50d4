"""The executor's prediction of the experts a step needs (`predict_resident`), shared by the
CrossPool executor and the simulator: by hand on a small weights pool, and in the simulator,
whose steps miss only where the prediction leaves a routed expert out (counts derived by hand
from the pool's slots and the LRU order)."""

import dataclasses

import pytest

from crosspool_jax.engine import EngineConfig
from crosspool_jax.engine.executors.crosspool import predict_resident, prefetch_predicted
from crosspool_jax.models.config import tiny_config
from crosspool_jax.pools.weights_pool import ExpertModelSpec, ShapeClass, WeightsPool
from crosspool_jax.sim import Routing, SimModel, Simulation
from crosspool_jax.sim import executor as sim_executor
from crosspool_jax.workloads import TraceRecord

SHAPE = ShapeClass(16, 8, "float32")


def _pool(slots: int) -> WeightsPool:
  """Models a and b, 4 experts in each of MoE layers 0 and 1, one shape class on 2 weights
  devices: layer l of either model is homed on device l (a's layers take devices 0, 1; b's
  continue at (0 + 2) mod 2 = 0)."""
  pool = WeightsPool(device_bytes=slots * SHAPE.expert_bytes, num_devices=2)
  for m in ("a", "b"):
    pool.register_model(ExpertModelSpec(m, SHAPE, 4, 2, (0, 1)), slots_per_device=slots)
  assert [pool.home_device(m, layer) for m in "ab" for layer in (0, 1)] == [0, 1, 0, 1]
  return pool


def test_prediction_by_hand():
  last = {("a", 0): [1], ("a", 1): [2, 3], ("b", 0): [0]}  # b's layer 1 has not run yet
  every = [0, 1, 2, 3]
  # 6 slots per device: one model's layer (4 experts) fits its partition: all of them, per
  # partition in order of first use (device 0, then device 1)
  pool = _pool(6)
  assert predict_resident(pool, [("a", 0), ("a", 1)], last) == [
      {("a", 0): every}, {("a", 1): every}]
  # both models: 8 experts per partition > 6 slots, so each layer's last choice
  layers = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
  assert predict_resident(pool, layers, last) == [
      {("a", 0): [1], ("b", 0): [0]}, {("a", 1): [2, 3], ("b", 1): []}]
  # 8 slots: both models' layers fit together again
  assert predict_resident(_pool(8), layers, last) == [
      {("a", 0): every, ("b", 0): every}, {("a", 1): every, ("b", 1): every}]
  # applied: each layer's plan, the predicted experts loaded where they are homed
  plans = prefetch_predicted(pool.prefetch, predict_resident(pool, layers, last))
  assert [(k, [key for key, _, _ in p.loads]) for k, p in plans] == [
      (("a", 0), [("a", 0, 1)]), (("b", 0), [("b", 0, 0)]),
      (("a", 1), [("a", 1, 2), ("a", 1, 3)]), (("b", 1), [])]
  assert pool.stats.prefetch_loads == 4 and pool.stats.accesses == 0


def _run(slots: int, records, *, routing: Routing | None = None):
  """The three-model CrossPool fleet of test_simulator (tiny mixtral: 2 MoE layers of 8
  experts each) on one weights device of `slots` slots, LRU."""
  config = EngineConfig(kv_policy="crosspool", page_elems=256, pages_per_device=200,
                        token_budget=24, token_buckets=(8, 24), max_batch=4, devices=(0, 1),
                        weight_devices=(2,), expert_slots_per_device=slots,
                        expert_policy="lru", micro_batch_min_tokens=4)
  fleet = {m: SimModel(tiny_config("mixtral"), max_batch=4, max_context=256, group=g)
           for m, g in zip("abc", (0, 1, 0), strict=True)}
  sim = Simulation(config, fleet, device="h100_sxm", routing=routing)
  sim.run(records)
  return sim


def test_a_fleet_whose_experts_fit_never_misses():
  """48 slots hold all 3 x 2 x 8 experts: before any step every expert of its layers is
  predicted, so no step misses, and each model's 16 experts load once, by prefetch."""
  records = [TraceRecord(arrival_s=0.001 * i, model_id="abc"[i % 3], prompt_len=6 + i,
                         max_new_tokens=3 + i % 4, seed=i) for i in range(12)]
  sim = _run(48, records)
  stats = sim.engine.weights_pool.pool.stats
  assert sim.executor.miss_steps == 0 and stats.misses == 0 and stats.evictions == 0
  assert stats.prefetch_loads == 48 and stats.hits == stats.accesses > 0
  assert [r["status"] for r in sim.engine.metrics()["requests"]] == ["finished"] * 12


def _round_robin(n: int):
  """n one-token requests a, b, c, a, ..., each arriving after the previous one finished:
  one step each, of one model."""
  return [TraceRecord(arrival_s=float(i), model_id="abc"[i % 3], prompt_len=6,
                      max_new_tokens=1, seed=i) for i in range(n)]


# Zipf with a huge exponent: each token picks its layer's two top-ranked experts (another
# one beats the second with probability about (2/3)^60, 3e-11), so every step of a model
# routes each layer to the same 2 experts: 4 per model, 12 for the fleet, in 8 slots.
STABLE = Routing(kind="zipf", exponent=60.0, seed=0)


@pytest.mark.parametrize("predicted", [True, False])
def test_prediction_saves_the_misses_of_a_repeated_choice(predicted, monkeypatch):
  """8 slots, steps of a, b, c in turn, each needing its 4 experts. On demand (the prediction
  off) LRU always evicts the experts of the model whose turn is next: all 9 steps miss, 36
  loads. Predicted: a model's first step has no last choice (and its 16 experts do not fit
  8 slots), so steps 1-3 miss (12 loads); from step 4 on its last choice (4 experts) is
  prefetched before the step, evicting the least recent model's, and every access hits."""
  if not predicted:
    monkeypatch.setattr(sim_executor, "predict_resident", lambda *args: [])
  sim = _run(8, _round_robin(9), routing=STABLE)
  stats = sim.engine.weights_pool.pool.stats
  assert len(sim.executor.step_s) == 9
  assert stats.accesses == 9 * 2 * 2  # every step: 2 layers x 2 distinct experts
  if predicted:
    assert sim.executor.miss_steps == 3
    assert stats.misses == 12 and stats.prefetch_loads == 6 * 4 and stats.evictions == 4 + 6 * 4
  else:
    assert sim.executor.miss_steps == 9
    assert stats.misses == 36 and stats.prefetch_loads == 0 and stats.evictions == 36 - 8


def test_prefetch_is_charged_before_the_step():
  """The same run: a predicted step (4 prefetched experts, no miss) costs less than its
  on-demand run (a speculative run, then the rerun with the 4 loads), and more than the same
  step with its experts already resident (a fleet whose experts fit, after its first step)."""
  predicted = _run(8, _round_robin(9), routing=STABLE).executor.step_s
  resident = _run(48, _round_robin(9), routing=STABLE).executor.step_s
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sim_executor, "predict_resident", lambda *args: [])
    on_demand = _run(8, _round_robin(9), routing=STABLE).executor.step_s
  assert predicted[:3] == on_demand[:3]  # the first steps: no prediction, the same misses
  for p, r, d in zip(predicted[3:], resident[3:], on_demand[3:], strict=True):
    assert r < p < d


@pytest.mark.parametrize("fits", [True, False])
def test_a_missed_step_is_retried_when_its_choices_fit(fits, monkeypatch):
  """The prediction off and 8 slots, every step misses. One-token requests of 6 tokens whose
  layers route to 2 experts each (STABLE): a step's 4 experts fit its (one) partition
  together, so the executor retries it, which hits (the drawn routing does not depend on
  hidden states) and reads nothing: the step's work is its resident run's twice. Of 24 tokens
  routed uniformly (48 picks of 8 experts per layer, both layers in one partition): more than
  8 experts, so the sync rerun, which also reads each expert call's routing, once per call."""
  routing, prompt_len = (STABLE, 6) if fits else (Routing(kind="uniform", seed=0), 24)
  records = [dataclasses.replace(r, prompt_len=prompt_len) for r in _round_robin(9)]
  resident = _run(48, records, routing=routing).executor.step_work
  monkeypatch.setattr(sim_executor, "predict_resident", lambda *args: [])
  sim = _run(8, records, routing=routing)
  assert sim.executor.miss_steps == 9
  assert sim.executor.expert_call_stats()["retry_runs"] == (9 if fits else 0)
  reads = 0
  for work, alone in zip(sim.executor.step_work, resident, strict=True):
    reads += work.transfers - 2 * alone.transfers
    # every program twice but the swap-ins (each run's own)
    assert work.programs == 2 * (alone.programs - alone.swaps) + work.swaps
  assert reads == (0 if fits else sim.executor.calls)
