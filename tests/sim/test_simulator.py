"""The simulator end to end on tiny configs: the schedule is the real engine's (a replay with
the fake executor gives the same batches, admissions, preemptions, rejections and outputs),
times are simulated, swap-ins are charged, bad input fails naming the argument."""

import dataclasses

import numpy as np
import pytest

from crosspool_jax.engine import Engine, EngineConfig
from crosspool_jax.engine.executors.api import FakeExecutor
from crosspool_jax.models.config import tiny_config
from crosspool_jax.roofline import DEVICES
from crosspool_jax.sim import Efficiency, Routing, SimClock, SimModel, Simulation, simulate
from crosspool_jax.sim.backend import HostBackend
from crosspool_jax.sim.cost_model import CostModel
from crosspool_jax.sim.simulator import offer
from crosspool_jax.workloads import LengthDist, TraceRecord, WorkloadConfig, generate_trace

MODELS = ("a", "b", "c")
# tiny mixtral: 2 KV heads x 16 dims = 64 elements per token and layer; 4 tokens a page
PAGE_ELEMS = 256
CONFIGS = {
    "shared": EngineConfig(kv_policy="shared", page_elems=PAGE_ELEMS, pages_per_device=61,
                           token_budget=24, token_buckets=(8, 24), max_batch=4,
                           devices=(0,)),
    "crosspool": EngineConfig(kv_policy="crosspool", page_elems=PAGE_ELEMS,
                              pages_per_device=31, token_budget=24, token_buckets=(8, 24),
                              max_batch=4, devices=(0, 1), weight_devices=(2,),
                              expert_slots_per_device=8, micro_batch_min_tokens=4),
}


def _fleet(policy):
  groups = (0, 1, 0) if policy == "crosspool" else (0, 0, 0)
  return {m: SimModel(tiny_config("mixtral"), max_batch=4, max_context=256, group=g)
          for m, g in zip(MODELS, groups, strict=True)}


def _trace():
  """A bursty trace tight enough for preemptions, with one request no pool can hold."""
  records = generate_trace(WorkloadConfig(
      model_ids=MODELS, num_requests=24, total_rate=2000.0, cv=2.0, seed=3,
      prompt_len=LengthDist(median=30, sigma=0.6, low=4, high=120),
      output_len=LengthDist(kind="uniform", low=4, high=12)))
  return sorted([*records, TraceRecord(arrival_s=records[5].arrival_s, model_id="b",
                                       prompt_len=200, max_new_tokens=8, seed=1)],
                key=lambda r: r.arrival_s)


class _Fake(FakeExecutor):
  """The fake executor, with the expert-call statistics an engine with a weights pool reports."""

  def expert_call_stats(self) -> dict:
    return {}


def _summary(batches):
  return [(b.model_id, [r.request_id for r in b.requests], list(b.num_new), b.decode_steps)
          for b in batches]


@pytest.mark.parametrize("policy", ["shared", "crosspool"])
def test_the_schedule_is_the_real_engines(policy):
  """The simulator's run, replayed through an engine with the fake executor (each record
  offered before the same step), gives identical batches, admissions, preemptions,
  rejections and outputs: scheduling does not depend on the executor."""
  config, fleet, records = CONFIGS[policy], _fleet(policy), _trace()
  sim = Simulation(config, fleet, device="cpu")
  seen, run = [], sim.executor.run_many

  def recording(batches):
    seen.append(_summary(batches))
    return run(batches)

  sim.executor.run_many = recording
  sim.run(records)

  fake = _Fake()
  engine = Engine(config, backend=HostBackend(lambda models, config, weights, kv_pools: fake))
  for m, e in fleet.items():
    engine.register_model(m, cfg=e.cfg, params={}, max_batch=e.max_batch,
                          max_context=e.max_context, group=e.group)
  engine.start()
  offered = {}
  for step, i in sim.offered:
    offered.setdefault(step, []).append(i)
  rejected = []
  for step in range(sim.engine.steps + 1):
    for i in offered.get(step, []):
      if offer(engine, records[i], f"r{i:05d}", fleet[records[i].model_id]):
        rejected.append(f"r{i:05d}")
    if step < sim.engine.steps:
      engine.step()

  assert [_summary(b) for b in fake.batches] == seen
  assert rejected == [r["request_id"] for r in sim.rejected] and len(rejected) == 1
  mine, theirs = sim.engine.metrics()["requests"], engine.metrics()["requests"]
  keys = ("request_id", "status", "preemptions", "output_tokens")
  assert [{k: r[k] for k in keys} for r in mine] == [{k: r[k] for k in keys} for r in theirs]
  assert sum(r["preemptions"] for r in mine) > 0, "the trace should make the pool preempt"
  assert all(sim.engine.output(r["request_id"]) == engine.output(r["request_id"])
             for r in mine)


def _two_requests_alone() -> Simulation:
  """A simulation run of two 8-token prompts of 3 new tokens each, at 5 s and 7 s: each alone
  (its prefill in one chunk, then two decodes)."""
  fleet = {"a": SimModel(tiny_config("mixtral"), max_batch=2, max_context=256)}
  records = [TraceRecord(arrival_s=5.0, model_id="a", prompt_len=8, max_new_tokens=3, seed=0),
             TraceRecord(arrival_s=7.0, model_id="a", prompt_len=8, max_new_tokens=3, seed=1)]
  sim = Simulation(CONFIGS["shared"], fleet, device="h100_sxm")
  sim.run(records)
  return sim


def test_every_engine_time_is_simulated():
  """Arrivals are the trace's times; a request's tokens come at the ends of modelled steps."""
  sim = _two_requests_alone()
  steps = sim.executor.step_s
  assert len(steps) == 6  # each request alone: its prefill (one chunk), then two decodes
  reqs = sim.engine.metrics()["requests"]
  first = sim.engine._get("r00000")
  assert first.arrival_s == 5.0 and first.admitted_s == 5.0
  assert first.token_s == pytest.approx(5.0 + np.cumsum(steps[:3]))
  second = sim.engine._get("r00001")
  assert second.arrival_s == 7.0  # the clock jumped over the idle gap
  assert second.token_s == pytest.approx(7.0 + np.cumsum(steps[3:]))
  assert reqs[0]["ttft_s"] == pytest.approx(steps[0])
  assert sim.clock() == pytest.approx(7.0 + sum(steps[3:]))


def test_steps_by_kind_are_the_engines_steps_with_their_times():
  """Two requests alone in turn: each a prefill step (its 8-token prompt in one chunk, its
  first token) and two decode steps; the engine's `steps_by_kind` holds those counts, the
  modelled step times as their seconds, and the tokens per kind."""
  sim = _two_requests_alone()
  steps = sim.executor.step_s
  kinds = sim.engine.metrics()["steps_by_kind"]
  prefill, decode = [steps[0], steps[3]], [steps[1], steps[2], steps[4], steps[5]]
  assert kinds["prefill"]["steps"] == 2 and kinds["decode"]["steps"] == 4
  assert kinds["prefill"]["step_s"]["p50"] == pytest.approx(np.median(prefill))
  assert kinds["decode"]["step_s"]["p50"] == pytest.approx(np.median(decode))
  assert kinds["decode"]["step_s"]["p99"] == pytest.approx(np.percentile(decode, 99))
  assert (kinds["prefill"]["tokens"], kinds["decode"]["tokens"]) == (2, 4)
  assert kinds["prefill"]["token_share"] == pytest.approx(1 / 3)


def _swap_run(expert_policy, slots):
  # unfused: the same expert calls either way (fusion would depend on what the slots hold)
  config = dataclasses.replace(CONFIGS["crosspool"], expert_policy=expert_policy,
                               expert_slots_per_device=slots, pages_per_device=200,
                               fuse_experts=False)
  records = [dataclasses.replace(r, arrival_s=0.0) for r in _trace()[:12]]
  sim = Simulation(config, {m: dataclasses.replace(e, group=0) for m, e in
                            _fleet("crosspool").items()},
                   device="h100_sxm", routing=Routing(kind="zipf", exponent=1.2, seed=1))
  sim.run(records)
  return sim


def test_swap_ins_are_charged():
  """A pool of 8 slots for 3 models x 2 layers x 8 experts misses and evicts; every step costs
  at least what it costs with every expert pinned (all arrivals at 0 and unfused calls: the
  same schedule and calls, the swap-ins only delay), and the run more."""
  pinned, small = _swap_run("pin_all", 48), _swap_run("lru", 8)
  assert pinned.engine.weights_pool.pool.stats.misses == 0
  stats = small.engine.weights_pool.pool.stats
  assert stats.misses > 0 and stats.evictions > 0 and stats.bytes_swapped > 0
  assert small.executor.miss_steps > 0
  assert len(small.executor.step_s) == len(pinned.executor.step_s)
  assert all(s >= p - 1e-15 for s, p in zip(small.executor.step_s, pinned.executor.step_s,
                                            strict=True))
  assert sum(small.executor.step_s) > sum(pinned.executor.step_s)


def test_simulate_returns_a_measured_runs_columns():
  out = simulate(CONFIGS["shared"], _fleet("shared"), _trace(), device="h200")
  assert out["counts"]["rejected"] == 1 and out["counts"]["finished"] == 24
  for key in ("ttft_s", "tbt_s", "goodput_requests_per_s", "slo_attainment", "per_model"):
    assert key in out["simulated"]
  assert out["simulated"]["step_s"]["steps"] == out["counts"]["steps"]


def test_bad_input_names_the_argument():
  with pytest.raises(ValueError, match=r"unknown device kind 'h900'.*h100_sxm"):
    CostModel("h900")
  assert set(DEVICES) >= {"h100_sxm", "h200", "b200", "tpu_v5e", "tpu_v5p", "tpu_v6e", "cpu"}
  with pytest.raises(ValueError, match="unknown device kind"):
    Simulation(CONFIGS["shared"], _fleet("shared"), device="tpu_v9")
  with pytest.raises(ValueError, match=r"efficiency\.attention"):
    Efficiency(attention=0.0)
  with pytest.raises(ValueError, match=r"routing\.kind"):
    Routing(kind="gauss")
  with pytest.raises(ValueError, match="fleet is empty"):
    Simulation(CONFIGS["shared"], {}, device="h100_sxm")
  overlap = dataclasses.replace(CONFIGS["crosspool"], weight_devices=(1,))
  with pytest.raises(ValueError, match=r"device split: devices \[1\] are in both pools"):
    Simulation(overlap, _fleet("crosspool"), device="h100_sxm")
  with pytest.raises(ValueError, match="cannot go back"):
    SimClock().advance(-1.0)


def test_crosspool_multistep_decode_is_refused_by_name():
  config = dataclasses.replace(CONFIGS["crosspool"], decode_steps_per_dispatch=4)
  with pytest.raises(ValueError, match="decode_steps_per_dispatch=4: the simulator models"):
    Simulation(config, _fleet("crosspool"), device="h200")
