"""A running engine under change: memory limits lowered and raised, models registered and
unregistered, a model's failing step, the soak of all of them; every surviving request's
tokens equal the reference generation."""

import jax.numpy as jnp
import pytest

from crosspool_jax.engine import Engine, EngineConfig, Status
from crosspool_jax.experiments.soak import SoakConfig, run_soak
from tests.engine.test_engine import MODELS, _references, _workload

BASE = dict(page_elems=512, token_budget=48, token_buckets=(16, 48), max_batch=4,
            attn_impl="reference", moe_impl="reference")


def _engine(policy, models, **overrides):
  if policy == "crosspool":
    cfg = BASE | dict(kv_policy="crosspool", devices=(0, 1), weight_devices=(2, 3),
                      pages_per_device=40, expert_slots_per_device=16, expert_policy="lru")
  else:
    cfg = BASE | dict(kv_policy=policy, pages_per_device=80)
  eng = Engine(EngineConfig(**(cfg | overrides)))
  for i, f in enumerate(models):
    eng.register_model(f, cfg=MODELS[f][0], params=MODELS[f][1], max_context=48, max_batch=4,
                       group=i % 2 if policy == "crosspool" else 0)
  eng.start()
  return eng


def _check_drained(eng):
  for pool in eng.pools.values():
    pool.check_invariants()
    assert pool.used_pages == 0 and not pool.requests
  if eng.weights_pool is not None:
    eng.weights_pool.pool.check_invariants()


@pytest.mark.parametrize("policy", ["shared", "crosspool"])
def test_limits_lowered_and_raised_mid_run_keep_every_token(policy):
  eng = _engine(policy, ("mixtral", "qwen3_moe"))
  work = [w for w in _workload(16, seed=11) if w[0] in ("mixtral", "qwen3_moe")]
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  for _ in range(3):
    eng.step()
  held = eng.pools[0].used_pages
  result = eng.set_memory_limit(kv_pages=14)  # one 48-token request of mixtral: 12 pages
  assert result["preempted"] and eng.pools[0].used_pages <= 14 < held
  assert all(eng.status(r) == Status.WAITING for r in result["preempted"])
  if policy == "crosspool":
    assert eng.set_memory_limit(expert_slots=8)["evicted_experts"] > 0
    assert all(p.owned <= 8 for c in eng.weights_pool.pool.classes for p in c.partitions)
  for _ in range(6):  # serve under the low limits
    eng.step()
    assert eng.pools[0].used_pages <= 14
  eng.set_memory_limit(kv_pages=eng.pools[0].capacity)
  if policy == "crosspool":
    eng.set_memory_limit(expert_slots=16)
  out = eng.generate_all()
  assert [out[r] for r in rids] == _references(work)
  assert sum(eng._requests[r].preemptions for r in rids) >= len(result["preempted"])
  _check_drained(eng)


def test_limit_below_every_request_blocks_then_raising_readmits():
  eng = _engine("shared", ("mixtral",))
  work = _workload(4, seed=12)[:1] * 3
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  eng.set_memory_limit(kv_bytes=0)
  assert list(eng.run()) == [] and eng.blocked
  assert all(eng.status(r) == Status.WAITING for r in rids)
  eng.set_memory_limit(kv_bytes=eng.pools[0].capacity * 512 * 4)
  out = eng.generate_all()
  assert [out[r] for r in rids] == _references(work)


def test_bad_limits_are_rejected_and_change_nothing():
  eng = _engine("shared", ("mixtral",))
  cap = eng.pools[0].capacity
  for kwargs, error in [({"kv_pages": cap + 1}, rf"in \[0, {cap}\]"),
                        ({"kv_pages": 4, "kv_bytes": 4}, "not both"),
                        ({"kv_pages": 4, "group": 3}, "group 3 has no KV pool"),
                        ({"expert_slots": 8}, "'shared' has no weights pool")]:
    with pytest.raises(ValueError, match=error):
      eng.set_memory_limit(**kwargs)
    assert eng.pools[0].limit == cap
  xp = _engine("crosspool", ("mixtral",))
  with pytest.raises(ValueError, match=r"must be an integer in \[8, 16\]"):
    xp.set_memory_limit(expert_slots=7)
  assert xp.weights_pool.pool.classes[0].limit == 16


@pytest.mark.parametrize("policy", ["static", "crosspool"])
def test_models_registered_and_unregistered_mid_run(policy):
  # static reserves max_context x max_batch x layers per model: 48 + 48 (+ olmoe's 96) pages
  eng = _engine(policy, ("mixtral", "qwen3_moe"),
                **({"pages_per_device": 200} if policy == "static" else {}))
  compiles = eng.metrics()["backend_compiles_since_start"]
  first = [w for w in _workload(8, seed=13) if w[0] in ("mixtral", "qwen3_moe")]
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in first]
  for _ in range(2):
    eng.step()
  eng.register_model("olmoe", cfg=MODELS["olmoe"][0], params=MODELS["olmoe"][1],
                     max_context=48, max_batch=4, group=1 if policy == "crosspool" else 0)
  late = [("olmoe", [7, 8, 9, 10], 6), ("olmoe", [4, 4], 6)]
  late_ids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in late]
  eng.step()
  gone = [r for r, w in zip(rids, first, strict=True) if w[0] == "qwen3_moe"]
  in_flight = sorted(r for r in gone if not eng._requests[r].done)
  assert in_flight and sorted(eng.unregister_model("qwen3_moe")) == in_flight
  with pytest.raises(ValueError, match="unknown model_id 'qwen3_moe'"):
    eng.submit(model_id="qwen3_moe", prompt_ids=[1], max_new_tokens=1)
  out = eng.generate_all()
  metrics = eng.metrics()  # before the references compile
  # the only compilations after start are the new model's
  assert metrics["backend_compiles_since_start"] - compiles == metrics[
      "backend_compiles_registering"] > 0
  kept = [(r, w) for r, w in zip(rids, first, strict=True) if w[0] == "mixtral"]
  assert [out[r] for r, _ in kept] == _references([w for _, w in kept])
  assert [out[r] for r in late_ids] == _references(late)
  assert all(eng._requests[r].finish_reason in ("unregistered", "length", "stop")
             for r in gone)
  _check_drained(eng)
  if policy == "crosspool":
    assert not [k for k in eng.weights_pool.pool.resident_keys() if k[0] == "qwen3_moe"]


def test_a_model_that_cannot_join_leaves_the_engine_unchanged():
  eng = _engine("static", ("mixtral",), pages_per_device=60)  # its reservation: 48 pages
  with pytest.raises(ValueError, match="static policy: model 'olmoe' needs 96 pages"):
    eng.register_model("olmoe", cfg=MODELS["olmoe"][0], params=MODELS["olmoe"][1],
                       max_context=48, max_batch=4)
  with pytest.raises(ValueError, match="unknown model_id 'olmoe'"):
    eng.submit(model_id="olmoe", prompt_ids=[1], max_new_tokens=1)
  rid = eng.submit(model_id="mixtral", prompt_ids=[5, 6], max_new_tokens=3)
  assert eng.generate_all()[rid] == _references([("mixtral", [5, 6], 3)])[0]


def test_a_failing_step_fails_its_model_only(monkeypatch):
  eng = _engine("shared", ("mixtral", "qwen3_moe"))
  work = [w for w in _workload(8, seed=14) if w[0] in ("mixtral", "qwen3_moe")]
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  eng.step()
  run = eng.executor.run

  def failing_run(batch, **kwargs):  # a device failure after the group's buffer was donated
    if batch.model_id == "mixtral":
      eng.executor.buffers[0].delete()
      raise RuntimeError("injected device failure")
    return run(batch, **kwargs)

  monkeypatch.setattr(eng.executor, "run", failing_run)
  events = []
  while not any(e.finish_reason == "error" for e in events):
    events += eng.step()
  monkeypatch.setattr(eng.executor, "run", run)
  out = eng.generate_all()
  failed = [r for r, w in zip(rids, work, strict=True) if w[0] == "mixtral"
            and eng.status(r) == Status.FAILED]
  assert failed and all("injected device failure" in eng._requests[r].error for r in failed)
  others = [(r, w) for r, w in zip(rids, work, strict=True) if w[0] == "qwen3_moe"]
  assert [out[r] for r, _ in others] == _references([w for _, w in others])  # recomputed
  assert not eng.executor.buffers[0].is_deleted()
  assert eng.metrics()["summary"]["overall"]["failed"] == len(failed)
  after = eng.submit(model_id="mixtral", prompt_ids=[3, 3], max_new_tokens=2)
  assert eng.generate_all()[after] == _references([("mixtral", [3, 3], 2)])[0]
  _check_drained(eng)


def test_crosspool_isolates_a_model_whose_params_break():
  eng = _engine("crosspool", ("mixtral", "qwen3_moe"))
  work = [w for w in _workload(8, seed=15) if w[0] in ("mixtral", "qwen3_moe")]
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  attn = eng.executor.models["qwen3_moe"].params["layers"][1]["attn"]
  good = attn["w_q_DNH"]
  attn["w_q_DNH"] = jnp.zeros((3,), good.dtype)  # its layer-1 stage raises while tracing
  eng.step()
  attn["w_q_DNH"] = good
  out = eng.generate_all()
  for r, w in zip(rids, work, strict=True):
    if w[0] == "qwen3_moe":
      assert eng.status(r) == Status.FAILED and eng._requests[r].error
    else:
      assert out[r] == _references([w])[0]
  _check_drained(eng)


@pytest.mark.parametrize("policy", ["shared", "crosspool"])
def test_soak_small(policy):
  # The same soak as scripts/soak.py (10,000 requests in the note), at test size.
  result = run_soak(SoakConfig(policy=policy, requests=150 if policy == "shared" else 60,
                               seed=3, sample=12))
  assert result["requests"] == result["finished"] + result["cancelled"] + result["unregistered"]
  assert result["cancelled"] > 0 and result["unregistered"] > 0 and result["limit_changes"] > 0
  assert result["sample_equal"] == result["sample_checked"] > 0
  assert result["compiles_after_start"] == result["compiles_registering"] > 0
  assert result["pages_in_use_at_end"] == 0 and result["slots_of_retired_model"] == 0


def test_nan_in_a_live_page_fails_that_request_only():
  eng = _engine("shared", ("mixtral", "qwen3_moe"))
  work = [("mixtral", [5, 6, 7], 6), ("qwen3_moe", [5, 6, 7], 6), ("mixtral", [9, 9], 6)]
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  eng.step()  # prefill: every request holds pages now
  pool = eng.pools[0]
  page = int(pool.tables("mixtral", [rids[0]])[0, 0, 0])  # layer 0, its first page
  buffers = eng.executor.buffers
  buffers[0] = buffers[0].at[page].set(jnp.nan)
  out = eng.generate_all()
  assert eng.status(rids[0]) == Status.FAILED
  assert "non-finite logits" in eng._requests[rids[0]].error
  assert [out[r] for r in rids[1:]] == _references(work[1:2]) + _references(work[2:])
  _check_drained(eng)
