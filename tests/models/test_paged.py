"""The model on the paged KV pool through the kernels vs its contiguous-cache reference.

The pool starts NaN-filled, so any read of a page (or slot) a sequence does not own shows up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.pools.kv_pool import KVPool
from tests.paged_harness import Req, kv_spec, run_paged

PAGE_ELEMS = 512  # 8 tokens/page for K*H = 32, 4 tokens/page for K*H = 64
MAX_CONTEXT = 40


def _models():
  shapes = {"mix": tiny_config("mixtral"),  # K=2, H=16
            "q3": tiny_config("qwen3_moe"),  # K=1, H=32
            "olmo": tiny_config("olmoe"),  # K=4, H=16
            "q2": tiny_config("qwen2_moe")}  # dense middle layer, shared expert, qkv bias
  return {name: (cfg, init_params(cfg, seed=i)) for i, (name, cfg) in enumerate(shapes.items())}


MODELS = _models()


def _requests(names, n_per_model=2, max_new=8):
  rng = np.random.default_rng(0)
  reqs = []
  for m in names:
    vocab = MODELS[m][0].vocab_size
    for j in range(n_per_model):
      prompt = rng.integers(0, vocab, size=int(rng.integers(1, 19))).tolist()
      reqs.append(Req(f"{m}{j}", m, prompt, max_new, arrival=2 * j))
  return reqs


def _reference(reqs):
  """Each model's requests as one batch of the contiguous-cache reference generation."""
  out = {}
  for m in {r.model for r in reqs}:
    mine = [r for r in reqs if r.model == m]
    cfg, params = MODELS[m]
    tokens = generate(params, cfg, [r.prompt for r in mine], max_new_tokens=mine[0].max_new)
    out |= {r.rid: t for r, t in zip(mine, tokens, strict=True)}
  return out


def _serve(names, pages, impl, reqs, devices=1):
  pool = KVPool(page_elems=PAGE_ELEMS, pages_per_device=pages, num_devices=devices)
  for m in names:
    pool.register_model(kv_spec(m, MODELS[m][0], max_context=MAX_CONTEXT, max_batch=2))
  pools = [jax.device_put(jnp.full((pages, PAGE_ELEMS), jnp.nan, jnp.float32), d)
           for d in jax.devices()[:devices]]
  out, pools, stats = run_paged({m: MODELS[m] for m in names}, reqs, pool, pools,
                                max_batch=2, max_tokens=40, impl=impl)
  assert pool.used_pages == 0 and not pool.requests  # every page returned
  pool.check_invariants()
  return out, stats


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_paged_greedy_equals_contiguous_reference(impl):
  reqs = _requests(["q2"], n_per_model=3)
  out, _ = _serve(["q2"], pages=64, impl=impl, reqs=reqs)
  assert out == _reference(reqs)


def test_models_of_different_shapes_share_one_pool():
  names = ["mix", "q3", "olmo"]
  reqs = _requests(names)
  out, stats = _serve(names, pages=96, impl="reference", reqs=reqs)
  assert stats["preempted"] == 0
  assert out == _reference(reqs)


def test_forced_preemption_recomputes_to_the_same_tokens():
  names = ["mix", "q3", "olmo"]
  reqs = _requests(names, max_new=10)
  out, stats = _serve(names, pages=21, impl="reference", reqs=reqs)
  assert stats["preempted"] > 0
  assert out == _reference(reqs)


def test_long_sequence_spreads_over_two_kv_devices():
  # 9 pages per device (8 usable): a 36-token mixtral request holds 5 pages x 2 layers = 10.
  assert len(jax.devices()) >= 2, "tests/conftest.py asks for several CPU devices"
  rng = np.random.default_rng(1)
  reqs = [Req("long", "mix", rng.integers(0, 512, size=28).tolist(), max_new=8),
          Req("short", "mix", rng.integers(0, 512, size=5).tolist(), max_new=8, arrival=1)]
  out, stats = _serve(["mix"], pages=9, impl="reference", reqs=reqs, devices=2)
  assert stats["spread"] >= 1
  assert out == _reference(reqs)
