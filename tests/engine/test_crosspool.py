"""The CrossPool policy: attention + KV on 2 KV devices, routed experts on 2 weights devices.

The module's engine fuses expert calls (the default); the long-request engine runs the unfused
ablation. Pieces of the fused path are tested in test_fused_experts.py."""

import jax
import numpy as np
import pytest

from crosspool_jax.engine import Engine, EngineConfig
from crosspool_jax.engine.executors.api import HostCounters, LocalTransfers
from crosspool_jax.engine.executors.crosspool import ping_pong, split_micro_batches
from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models.sampling import SamplingParams
from tests.engine.test_engine import FAMILIES, MODELS, _reference, _references, _workload


def _crosspool(pages, models=FAMILIES, homes=None, registry=MODELS, **overrides):
  cfg = dict(kv_policy="crosspool", devices=(0, 1), weight_devices=(2, 3), page_elems=512,
             pages_per_device=pages, token_budget=48, token_buckets=(16, 48), max_batch=4,
             attn_impl="reference", moe_impl="reference", expert_slots_per_device=8,
             expert_policy="lru", micro_batches=2, timeline_every=1) | overrides
  eng = Engine(EngineConfig(**cfg))
  for i, f in enumerate(models):  # home KV devices alternate: 0, 1, 0, 1 (unless given)
    eng.register_model(f, cfg=registry[f][0], params=registry[f][1], max_context=48, max_batch=4,
                       group=i % 2 if homes is None else homes[i])
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
  compiles = crosspool.metrics()["backend_compiles_since_start"]  # other tests compile too
  out = crosspool.generate_all()
  metrics = crosspool.metrics()
  assert metrics["backend_compiles_since_start"] == compiles  # every fused shape warmed
  assert [out[r] for r in rids] == _references(work)
  assert metrics["pools"]["0"]["preemptions"] > 0
  assert metrics["weights_pool"]["misses"] > 0 and metrics["weights_pool"]["evictions"] > 0
  assert metrics["pools"]["0"]["used_pages_now"] == 0
  calls = metrics["expert_calls"]  # one class, 2 weights devices: micro-batches share calls
  assert calls["fused"] and 0 < calls["calls"] < calls["micro_batches"]
  assert calls["mean_members_per_call"] > 1
  assert calls["splits"] > 0  # 8 slots: some groups' experts did not fit one call
  # 25 % of the experts resident: speculative runs miss and rerun with loads, still exact:
  # retried with what they chose loaded, or in the sync mode (reads before the tokens) when
  # that does not fit 8 slots or the retry misses again.
  assert calls["miss_steps"] > 0 and calls["retry_runs"] > 0
  assert calls["miss_steps"] - calls["retry_runs"] + calls["retry_misses"] > 0
  assert calls["reads_before_tokens"] > 0


class _RecordingTransfers(LocalTransfers):
  """The executor's puts within this process, recorded: (leaves, destination device)."""

  def __init__(self):
    self.puts = []

  def put(self, tree, device):
    devices = device if isinstance(device, (list, tuple)) else [device]
    trees = tree if isinstance(device, (list, tuple)) else [tree]
    self.puts += [(jax.tree.leaves(t), d) for t, d in zip(trees, devices, strict=True)]
    return super().put(tree, device)


def test_resident_experts_step_with_no_read_before_the_tokens():
  # pin_all: every expert resident, so no step may read the device before its sampled tokens,
  # and no call may transfer anything implicitly (the guard raises on any implicit transfer).
  eng = _crosspool(pages=24, expert_policy="pin_all", expert_slots_per_device=32)
  work = _workload(8, seed=3)
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  before = eng.metrics()
  eng.executor.transfers = recording = _RecordingTransfers()
  with jax.transfer_guard("disallow"):
    out = eng.generate_all()
  after = eng.metrics()
  assert [out[r] for r in rids] == _references(work)
  # What the weights devices get from other devices: ONE uint8 array (its expert message) per
  # micro-batch a MoE layer's expert calls served, nothing else (host data: scalars kept).
  to_weights = [x for leaves, dst in recording.puts for x in leaves
                if dst in eng.executor.wpool.devices and isinstance(x, jax.Array)]
  served = after["expert_calls"]["micro_batches"] - before["expert_calls"]["micro_batches"]
  assert served > 0 and len(to_weights) == served
  assert all(x.dtype == np.uint8 and x.ndim == 2 for x in to_weights)
  assert after["backend_compiles_since_start"] == before["backend_compiles_since_start"]
  calls, host = after["expert_calls"], after["host"]
  assert calls["miss_steps"] == 0 and calls["reads_before_tokens"] == 0
  assert after["weights_pool"]["misses"] == 0 and after["weights_pool"]["hits"] > 0
  # Reads per step: each micro-batch's tokens and each weights device's routing, no more.
  assert host["steps"] > 0 and host["blocking_reads_per_step"] <= 2 * 4 + 2
  assert 0 < host["dispatches_per_step"]
  # The host thread's CPU time is within its wall time (both less the blocking reads).
  assert 0 < host["host_cpu_us_per_token"] <= 1.01 * host["host_us_per_token"]


def test_multistep_decode_equals_reference_with_preemption_and_swapping():
  # 4 decode steps per dispatch with the module's small pools: pages spread over both KV
  # devices and 25 % of the experts resident, so most decode iterations decline the chunk and
  # run one step (each request gets one token of its reserved four); still exact.
  eng = _crosspool(pages=24, decode_steps_per_dispatch=4)
  work = _workload(10, seed=4)
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  before = eng.metrics()["backend_compiles_since_start"]
  out = eng.generate_all()
  metrics = eng.metrics()
  assert [out[r] for r in rids] == _references(work)
  assert metrics["backend_compiles_since_start"] == before
  assert metrics["pools"]["0"]["preemptions"] > 0 and metrics["weights_pool"]["misses"] > 0
  assert metrics["expert_calls"]["chunk_declined"] > 0
  assert metrics["pools"]["0"]["used_pages_now"] == 0


def test_multistep_decode_chunks_read_tokens_once():
  """pin_all and pages to spare on each home device: decode-only iterations run as chunks of
  4 steps with no device read between them (under the transfer guard: no implicit transfer
  either); greedy and seeded-sampled tokens equal the reference, a stop id ends a request
  inside a chunk, nothing compiles after start, and the blocking reads per generated token
  fall below half those of the same engine run one step per dispatch."""
  work = _workload(8, seed=5, max_new=24, max_prompt=20)
  sampling = [None if i % 2 else SamplingParams(temperature=0.9, top_k=40, top_p=0.95,
                                                seed=100 + i) for i in range(len(work))]
  expected = [_reference(m, p, n, s) for (m, p, n), s in zip(work, sampling, strict=True)]
  k = next(k for k in range(3, 6) if expected[1][k] not in expected[1][:k])  # in a chunk
  stops = [()] * len(work)
  stops[1] = (expected[1][k],)
  expected[1] = expected[1][:k + 1]
  eng = _crosspool(pages=96, expert_policy="pin_all", expert_slots_per_device=32,
                   decode_steps_per_dispatch=4)
  before = eng.metrics()["backend_compiles_since_start"]
  host, runs = {}, 0
  for steps in (1, 4):  # the scheduler reserves pages for `steps` tokens: 1 = no chunk
    eng.scheduler.decode_steps = steps
    eng.executor.counters = HostCounters()
    rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n, sampling=s, stop_ids=stop)
            for (m, p, n), s, stop in zip(work, sampling, stops, strict=True)]
    with jax.transfer_guard("disallow"):
      out = eng.generate_all()
    metrics = eng.metrics()
    assert [out[r] for r in rids] == expected, steps
    assert eng._requests[rids[1]].finish_reason == "stop"
    assert metrics["backend_compiles_since_start"] == before
    calls = metrics["expert_calls"]
    assert calls["reads_before_tokens"] == 0 and calls["miss_steps"] == 0
    assert calls["chunk_declined"] == 0 and (calls["chunk_runs"] > runs) == (steps > 1)
    runs = calls["chunk_runs"]
    host[steps] = metrics["host"]
    assert host[steps]["tokens"] == sum(map(len, expected))
  assert host[4]["blocking_reads_per_token"] < host[1]["blocking_reads_per_token"] / 2


def test_small_batches_are_not_cut_into_micro_batches():
  eng = _crosspool(pages=24, models=("mixtral",), micro_batch_min_tokens=8)
  ex = eng.executor

  def cut(batch):
    return split_micro_batches(batch, ex.micro_batches, ex.micro_batch_min_tokens)

  reqs = ["r0", "r1", "r2", "r3"]  # the split only counts and slices them
  decode = ModelBatch("mixtral", reqs, [1, 1, 1, 1])  # 4 tokens: one micro-batch
  prefill = ModelBatch("mixtral", reqs, [8, 8, 8, 8])  # 32 tokens: micro_batches=2 parts
  assert [len(b.requests) for b in cut(decode)] == [4]
  assert [len(b.requests) for b in cut(prefill)] == [2, 2]


def test_ping_pong_phases_balance_tokens_and_keep_a_batch_in_order():
  a = ModelBatch("a", ["a0", "a1"], [8, 8])  # cut in two: phases 0 and 1, 8 tokens each
  b = ModelBatch("b", ["b0"], [1])  # too small to cut: the least loaded phase (tie: 0)
  c = ModelBatch("c", ["c0"], [1])  # then phase 1 (9 tokens against 8)
  d = ModelBatch("d", ["d0", "d1", "d2"], [4, 4, 4])  # 2 parts: 8 and 4 tokens, phases 0, 1
  phased = ping_pong([a, b, c, d], 2, 0)
  assert [(phase, owner, part.requests) for phase, owner, part in phased] == [
      (0, 0, ["a0"]), (0, 1, ["b0"]), (0, 3, ["d0", "d1"]),
      (1, 0, ["a1"]), (1, 2, ["c0"]), (1, 3, ["d2"])]
  # One phase (no pipeline): everything in phase 0, in order.
  assert [(p, o) for p, o, _ in ping_pong([a, b], 1, 0)] == [(0, 0), (0, 1)]


def test_models_of_one_class_share_expert_calls_within_a_phase(crosspool):
  # mixtral (home KV device 0) and qwen3_moe (home 1): one expert shape class, and layer l of
  # both is homed on weights device l % 2; two requests each, so each model batch is cut into
  # two micro-batches, one per ping-pong phase; 4 steps.
  work = [("mixtral", [3, 1, 4, 1, 5], 4), ("mixtral", [2, 7, 1, 8, 2], 4),
          ("qwen3_moe", [9, 2, 6], 4), ("qwen3_moe", [5, 3, 5], 4)]
  before = dict(crosspool.metrics()["expert_calls"])
  events = len(crosspool.executor.timeline.events)
  rids = [crosspool.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  out = crosspool.generate_all()
  assert [out[r] for r in rids] == _references(work)
  after = crosspool.metrics()["expert_calls"]
  calls = after["calls"] - before["calls"]
  served = after["micro_batches"] - before["micro_batches"]
  assert served == 4 * 4 * 2  # 4 steps x 4 micro-batches x 2 MoE layers
  assert calls < served
  fused = [e for e in crosspool.executor.timeline.events[events:]
           if e["kind"] == "experts" and not e["discarded"]]  # (a missed run's are discarded)
  assert len(fused) == calls
  assert any(sorted(e["models"]) == ["mixtral", "qwen3_moe"] for e in fused)
  assert all(len(e["members"]) == len(e["models"]) for e in fused)
  # A batch's two micro-batches are in different phases, so they never share a call: the
  # first phase's experts can run while the second phase's attention does.
  assert all(len(set(e["models"])) == len(e["models"]) for e in fused)


def test_timeline_shows_micro_batches_in_flight_together(crosspool):
  work = _workload(8, seed=5)
  events = len(crosspool.executor.timeline.events)
  swap_calls = crosspool.executor.wpool.pool.stats.swap_calls
  for m, p, n in work:
    crosspool.submit(model_id=m, prompt_ids=p, max_new_tokens=n)
  crosspool.generate_all()
  timeline = crosspool.executor.timeline
  overlap = timeline.overlap()
  kinds = {e["kind"] for e in timeline.events}
  assert {"attention_side", "transfer_to_weights", "experts", "transfer_back"} <= kinds
  # Every step is recorded (timeline_every=1), so every swap-in of the run is on the timeline,
  # on a weights device: made resident before a step, or loaded by the miss path.
  swaps = [e for e in timeline.events[events:] if e["kind"].startswith("swap")]
  assert len(swaps) == crosspool.executor.wpool.pool.stats.swap_calls - swap_calls > 0
  assert {e["kind"] for e in swaps} == {"swap_prefetch", "swap"}
  weights_devices = {str(d) for d in crosspool.executor.wpool.devices}
  assert {e["device"] for e in swaps} <= weights_devices
  assert len({e["micro_batch"] for e in timeline.events}) >= 2
  assert max(len(e["members"]) for e in timeline.events if e["kind"] == "experts") >= 2
  assert all(e["end"] >= e["start"] for e in timeline.events)
  assert overlap["transfers_concurrent_with_compute"] > 0
  assert 0 < overlap["overlap_fraction"] <= 1


def test_long_request_spreads_over_both_kv_devices_unfused():
  # 7 usable pages per KV device; home KV device 1; one expert call per micro-batch.
  eng = _crosspool(pages=8, models=("mixtral",), homes=(1,), fuse_experts=False)
  rng = np.random.default_rng(9)
  prompt = rng.integers(0, 512, size=40).tolist()  # 48 tokens: 6 pages x 2 layers = 12 > 7
  rid = eng.submit(model_id="mixtral", prompt_ids=prompt, max_new_tokens=8)
  eng.step()
  pool = eng.pools[0]
  tables = pool.tables("mixtral", [rid])
  assert set(np.unique(tables[tables > 0] // pool.pages_per_device)) == {0, 1}
  out = eng.generate_all()
  assert out[rid] == _references([("mixtral", prompt, 8)])[0]
  calls = eng.metrics()["expert_calls"]
  assert not calls["fused"] and calls["calls"] == calls["micro_batches"] > 0
  assert {e["device"] for e in eng.executor.timeline.events if e["kind"] == "merge_router"} == {
      str(eng.executor.kv_devices[1])}


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


def test_home_kv_device_out_of_range_fails_at_registration():
  with pytest.raises(ValueError, match="group 2 is not one of the 2"):
    _crosspool(pages=24, models=("mixtral",), homes=(2,))
