"""A DeepSeek-V2 model (latent attention: pages of latent rows; a dense first layer,
group-limited routing, shared experts) served by the paged engine next to a Mixtral model in
ONE KV pool, under the colocated policies (shared with preemption, static with multi-step
decode) and crosspool (with preemption and a sequence spread over 2 KV devices): greedy tokens
equal `generate`'s."""

import numpy as np
import pytest

from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import init_params
from tests.engine.test_crosspool import _crosspool
from tests.engine.test_engine import MODELS, _engine, _references, _workload

# A latent row of 56 + 8 = 64 elements: 8 tokens a page of 512, as Mixtral's 2 x 2 x 16.
DEEPSEEK = tiny_config("deepseek_v2", kv_lora_rank=56, head_dim=56 + 8)
FLEET = {"mixtral": MODELS["mixtral"], "deepseek_v2": (DEEPSEEK, init_params(DEEPSEEK, seed=7))}
NAMES = tuple(FLEET)


def test_the_tiny_model_exercises_what_the_engine_must_serve():
  assert DEEPSEEK.mla and DEEPSEEK.kv_stores == 1
  assert DEEPSEEK.moe_layers == (False, True)  # a dense first layer
  assert DEEPSEEK.topk_method == "group_limited_greedy" and DEEPSEEK.topk_group < DEEPSEEK.n_group
  assert DEEPSEEK.d_ff_shared > 0


def _run(eng, work):
  """Submits every (model, prompt, max_new) of `work`, runs the engine dry; returns each
  request's tokens and how many times the DeepSeek requests were preempted in all."""
  rids = [eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n) for m, p, n in work]
  out = eng.generate_all()
  preempted = sum(eng._requests[r].preemptions for r, (m, _, _) in zip(rids, work, strict=True)
                  if m == "deepseek_v2")
  return [out[r] for r in rids], preempted


@pytest.mark.parametrize("policy, pages, steps", [("shared", 24, 1), ("static", 97, 4)])
def test_colocated_greedy_equals_reference(policy, pages, steps):
  # shared: 23 pages for 8 requests of up to 12 pages each, so requests are preempted and
  # recomputed (DeepSeek's among them); static reserves 6 pages x 4 rows x 2 layers per model
  # (96) and decodes up to 4 steps a dispatch.
  eng = _engine(policy, pages=pages, models=FLEET, decode_steps_per_dispatch=steps)
  assert eng.pools[0].page_tokens("deepseek_v2") == eng.pools[0].page_tokens("mixtral") == 8
  work = _workload(10, seed=1, families=NAMES)
  out, preempted = _run(eng, work)
  assert out == _references(work, models=FLEET)
  assert (preempted > 0) == (policy == "shared")
  # one dispatch or more a step, unless several decode steps share one
  assert (eng.metrics()["host"]["dispatches_per_step"] < 1) == (steps > 1)
  assert all(pool.used_pages == 0 for pool in eng.pools.values())


def test_crosspool_spreads_a_latent_sequence_over_two_kv_devices_and_preempts():
  # 9 usable pages per KV device; DeepSeek at home on device 1, Mixtral on device 0; one token
  # bucket (compiling fewer programs at start-up).
  eng = _crosspool(pages=10, models=NAMES, homes=(0, 1), registry=FLEET, token_buckets=(48,))
  rng = np.random.default_rng(9)
  long = ("deepseek_v2", rng.integers(0, 512, size=40).tolist(), 8)  # 5 pages x 2 layers > 9
  rid = eng.submit(model_id=long[0], prompt_ids=long[1], max_new_tokens=long[2])
  eng.step()
  pool = eng.pools[0]
  tables = pool.tables("deepseek_v2", [rid])
  assert set(np.unique(tables[tables > 0] // pool.pages_per_device)) == {0, 1}
  work = _workload(8, seed=2, families=NAMES, max_prompt=20)
  out, preempted = _run(eng, work)
  assert eng.output(rid) == _references([long], models=FLEET)[0]
  assert out == _references(work, models=FLEET)
  assert preempted > 0
  merges = {e["device"] for e in eng.executor.timeline.events
            if e["kind"] == "merge_router" and e["model"] == "deepseek_v2"}
  assert merges == {str(eng.executor.kv_devices[1])}  # partials merged at home
  assert pool.used_pages == 0


def test_crosspool_partitioned_gives_the_latent_model_slots_of_its_own():
  # One weights device, 8 slots per model: DeepSeek's one MoE layer of 8 experts stays
  # resident, Mixtral's 2 x 8 swap; no expert call serves both models.
  eng = _crosspool(pages=24, models=NAMES, registry=FLEET, kv_policy="crosspool_partitioned",
                   weight_devices=(2,), expert_slots_per_device=8, token_buckets=(48,))
  pool = eng.weights_pool.pool
  assert sorted(c.shape.owner for c in pool.classes) == sorted(NAMES)
  work = _workload(8, seed=3, families=NAMES, max_prompt=20)
  out, _ = _run(eng, work)
  assert out == _references(work, models=FLEET)
  assert pool.stats.evictions > 0
  calls = [e for e in eng.executor.timeline.events if e["kind"] == "experts"]
  assert calls and all(len(set(e["models"])) == 1 for e in calls)
  assert {m for e in calls for m in e["models"]} == set(NAMES)
  pool.check_invariants()
  assert eng.pools[0].used_pages == 0
