"""The model step on the paged KV pool (`forward_paged`, run by the engine's colocated
executor; latent attention on pages of latent rows) vs its contiguous-cache reference.

The KV buffers start NaN-filled, so any read of a page (or slot) a sequence does not own shows
up. A sequence spread over several KV devices: tests/models/test_stages.py (the stages) and
tests/engine/test_crosspool.py (end to end).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.engine import Engine, EngineConfig
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.pools.kv_buffers import allocate_kv_buffer

MAX_CONTEXT = 40


def _models():
  shapes = {"mix": tiny_config("mixtral"),  # K=2, H=16
            "q3": tiny_config("qwen3_moe"),  # K=1, H=32
            "olmo": tiny_config("olmoe"),  # K=4, H=16
            "q2": tiny_config("qwen2_moe"),  # dense middle layer, shared expert, qkv bias
            # latent rows of 56 + 8 (8 a page), noaux_tc routing, a dense first layer, no q LoRA
            "ds3": tiny_config("deepseek_v3", kv_lora_rank=56, head_dim=64, q_lora_rank=None)}
  return {name: (cfg, init_params(cfg, seed=i)) for i, (name, cfg) in enumerate(shapes.items())}


MODELS = _models()


def _requests(names, n_per_model=2, max_new=8):
  """(model, prompt, max_new, arrival step) of each request."""
  rng = np.random.default_rng(0)
  return [(m, rng.integers(0, MODELS[m][0].vocab_size, size=int(rng.integers(1, 19))).tolist(),
           max_new, 2 * j) for m in names for j in range(n_per_model)]


def _reference(reqs):
  """Each model's requests as one batch of the contiguous-cache reference generation."""
  out = [None] * len(reqs)
  for m in {r[0] for r in reqs}:
    idx = [i for i, r in enumerate(reqs) if r[0] == m]
    cfg, params = MODELS[m]
    tokens = generate(params, cfg, [reqs[i][1] for i in idx], max_new_tokens=reqs[idx[0]][2])
    for i, t in zip(idx, tokens, strict=True):
      out[i] = t
  return out


def _serve(names, pages, impl, reqs):
  """Serves `reqs` (each submitted at its arrival step) on a NaN-filled shared pool."""
  eng = Engine(EngineConfig(kv_policy="shared", page_elems=512, pages_per_device=pages,
                            token_budget=40, token_buckets=(40,), max_batch=2,
                            attn_impl=impl, moe_impl=impl))
  for m in names:
    eng.register_model(m, cfg=MODELS[m][0], params=MODELS[m][1], max_context=MAX_CONTEXT,
                       max_batch=2)
  eng.start()
  (pool,) = eng.pools.values()
  device = eng.executor.buffers[0].devices().pop()
  eng.executor.buffers[0] = allocate_kv_buffer(pool, device, dtype=jnp.float32,
                                               fill=float("nan"))
  rids = [None] * len(reqs)
  for step in range(max(r[3] for r in reqs) + 1):
    for i, (m, p, n, arrival) in enumerate(reqs):
      if arrival == step:
        rids[i] = eng.submit(model_id=m, prompt_ids=p, max_new_tokens=n)
    eng.step()
  out = eng.generate_all()
  assert pool.used_pages == 0 and not pool.requests  # every page returned
  pool.check_invariants()
  return [out[r] for r in rids], sum(eng._requests[r].preemptions for r in rids)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
@pytest.mark.parametrize("name", ["q2", "ds3"])
def test_paged_greedy_equals_contiguous_reference(impl, name):
  reqs = _requests([name], n_per_model=3)
  out, _ = _serve([name], pages=64, impl=impl, reqs=reqs)
  assert out == _reference(reqs)


def test_models_of_different_shapes_share_one_pool_with_forced_preemption():
  names = ["mix", "q3", "olmo"]
  reqs = _requests(names, max_new=10)
  out, preemptions = _serve(names, pages=21, impl="reference", reqs=reqs)
  assert preemptions > 0
  assert out == _reference(reqs)
