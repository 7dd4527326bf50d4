"""The engine against the reference generation: 4 models of 3 shapes, both KV policies,
forced preemption, seeded sampling, cancellation, bad input, a 1,000-request soak (a
latent-attention model mixed in: test_latent_engine.py)."""

import numpy as np
import pytest

from crosspool_jax.engine import Engine, EngineConfig, Status
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.models.sampling import SamplingParams

FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")  # KV shapes: 2x16, 1x32, 4x16, 2x16
MODELS = {f: (tiny_config(f), init_params(tiny_config(f), seed=i)) for i, f in enumerate(FAMILIES)}
MAX_CONTEXT = 48


def _engine(policy, pages, buckets=(16, 48), models=MODELS, **overrides):
  eng = Engine(EngineConfig(**dict(kv_policy=policy, page_elems=512, pages_per_device=pages,
                                   token_budget=48, token_buckets=buckets, max_batch=4,
                                   attn_impl="reference", moe_impl="reference") | overrides))
  for f, (cfg, params) in models.items():
    eng.register_model(f, cfg=cfg, params=params, max_context=MAX_CONTEXT, max_batch=4)
  eng.start()
  return eng


@pytest.fixture(scope="module")
def shared():
  return _engine("shared", pages=48)  # small: preemption is forced


@pytest.fixture(scope="module")
def static():
  # static reserves max_context x max_batch x layers per model: 48 + 48 + 96 + 72 pages
  return _engine("static", pages=265, buckets=(48,))


def _workload(n, seed, max_new=8, max_prompt=30, families=FAMILIES):
  rng = np.random.default_rng(seed)
  return [(families[i % len(families)],
           rng.integers(0, 512, size=int(rng.integers(1, max_prompt))).tolist(), max_new)
          for i in range(n)]


def _reference(model, prompt, max_new, sampling=None):
  cfg, params = MODELS[model]
  return generate(params, cfg, [prompt], max_new_tokens=max_new, sampling=sampling)[0]


def _references(work, models=MODELS):
  """Greedy reference of every (model, prompt, max_new), one batched call per model."""
  out = [None] * len(work)
  for m in {w[0] for w in work}:
    idx = [i for i, w in enumerate(work) if w[0] == m]
    cfg, params = models[m]
    gens = generate(params, cfg, [work[i][1] for i in idx], max_new_tokens=work[idx[0]][2])
    for i, g in zip(idx, gens, strict=True):
      out[i] = g
  return out


@pytest.mark.parametrize("policy", ["shared", "static"])
def test_greedy_outputs_equal_reference(policy, request):
  eng = request.getfixturevalue(policy)
  work = _workload(12, seed=1)
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  out = eng.generate_all()
  assert [out[r] for r in rids] == _references(work)
  if policy == "shared":
    assert sum(eng._requests[r].preemptions for r in rids) > 0  # the small pool preempted
  assert all(pool.used_pages == 0 for pool in eng.pools.values())


def test_seeded_sampling_is_batch_independent(shared):
  sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=77)
  prompt = [5, 6, 7, 8, 9]
  alone = shared.submit(model_id="olmoe", prompt_ids=prompt, max_new_tokens=10,
                        sampling=sampling)
  shared.generate_all()
  busy = [shared.submit(model_id=m, prompt_ids=p, max_new_tokens=n)
          for m, p, n in _workload(8, seed=2)]
  crowd = shared.submit(model_id="olmoe", prompt_ids=prompt, max_new_tokens=10,
                        sampling=sampling)
  shared.generate_all()
  assert shared.output(alone) == shared.output(crowd)
  assert shared.output(alone) == _reference("olmoe", prompt, 10, sampling)
  assert all(shared.status(r) == Status.FINISHED for r in busy)


def test_cancel_mid_decode_leaves_others_intact(shared):
  work = _workload(6, seed=3)
  rids = [shared.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  victim = rids[2]
  for _ in range(40):
    shared.step()
    if 0 < len(shared.output(victim)) < 8:
      break
  assert 0 < len(shared.output(victim)) < 8
  shared.cancel(victim)
  assert shared.status(victim) == Status.CANCELLED
  out = shared.generate_all()
  expected = _references(work)
  for i, rid in enumerate(rids):
    if rid != victim:
      assert out[rid] == expected[i]
  assert all(pool.used_pages == 0 for pool in shared.pools.values())


@pytest.mark.parametrize("kwargs, error", [
    ({"model_id": "llama"}, "unknown model_id 'llama'"),
    ({"prompt_ids": []}, "prompt_ids is empty"),
    ({"prompt_ids": [1, 512]}, r"outside \[0, 512\)"),
    ({"prompt_ids": [1] * 45}, "exceeds model 'mixtral' max context 48"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"sampling": {"temperature": 1.0}}, "sampling must be a SamplingParams"),
])
def test_bad_input_is_rejected_and_changes_nothing(shared, kwargs, error):
  before = dict(shared._requests)
  args = {"model_id": "mixtral", "prompt_ids": [1, 2], "max_new_tokens": 4} | kwargs
  with pytest.raises(ValueError, match=error):
    shared.submit(**args)
  assert shared._requests == before
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)


def test_soak_returns_every_page_and_never_recompiles(shared):
  work = _workload(1000, seed=4, max_new=3, max_prompt=12)
  rids = [shared.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  compiles_before = shared.metrics()["backend_compiles_since_start"]  # other tests compile too
  out = shared.generate_all()
  metrics = shared.metrics()
  assert metrics["backend_compiles_since_start"] == compiles_before
  assert all(len(out[r]) == 3 for r in rids)
  sample = list(range(0, 1000, 25))  # spot-check 40 of them against the reference
  assert [out[rids[i]] for i in sample] == _references([work[i] for i in sample])
  assert metrics["compile_count"] == metrics["compile_count_at_start"] == 8
  assert all(pool.used_pages == 0 and not pool.requests for pool in shared.pools.values())
  for pool in shared.pools.values():
    pool.check_invariants()
  summary = metrics["summary"]["per_model"]
  assert set(summary) == set(FAMILIES)
  assert all(s["ttft_s"]["p99"] is not None for s in summary.values())
