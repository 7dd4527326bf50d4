"""Reference generation against a cache-free oracle, seeds, stop ids and input errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import KVCache, forward, init_params
from crosspool_jax.models.sampling import SamplingParams

PROMPTS = [[3, 9, 27, 81, 243], [7], [100, 200, 300]]


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config("qwen2_moe")
  return cfg, init_params(cfg, seed=3)


def _greedy_without_cache(params, cfg, prompt, n):
  """Oracle: recompute the whole sequence from a fresh cache for every new token."""
  width = len(prompt) + n  # one padded shape, one compilation
  seq = list(prompt)
  for _ in range(n):
    tokens = np.zeros((1, width), np.int32)
    positions = np.full((1, width), -1, np.int32)
    tokens[0, : len(seq)] = seq
    positions[0, : len(seq)] = np.arange(len(seq))
    logits, _ = forward(params, jnp.asarray(tokens), jnp.asarray(positions),
                        KVCache.zeros(cfg, 1, width), cfg=cfg)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_matches_cache_free_oracle(model):
  cfg, params = model
  ours = generate(params, cfg, PROMPTS, max_new_tokens=10)
  for prompt, out in zip(PROMPTS, ours, strict=True):
    assert out == _greedy_without_cache(params, cfg, prompt, 10)


def test_sampled_generation_does_not_depend_on_batch(model):
  cfg, params = model
  sampling = [SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=s) for s in (1, 2, 3)]
  batched = generate(params, cfg, PROMPTS, max_new_tokens=12, sampling=sampling)
  alone = generate(params, cfg, PROMPTS[:1], max_new_tokens=12, sampling=sampling[0])
  assert alone[0] == batched[0]
  other_seed = generate(params, cfg, PROMPTS[:1], max_new_tokens=12,
                        sampling=SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=9))
  assert other_seed[0] != batched[0]


def test_stop_ids_end_the_sequence(model):
  cfg, params = model
  (full,) = generate(params, cfg, PROMPTS[:1], max_new_tokens=10)
  stop = full[3]
  first = full.index(stop)
  (cut,) = generate(params, cfg, PROMPTS[:1], max_new_tokens=10, stop_ids=[stop])
  assert cut == full[: first + 1]


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "prompts is empty"),
    ([[1], []], {}, r"prompts\[1\] is empty"),
    ([[1, 512]], {}, r"prompts\[0\] has token ids outside \[0, 512\): \[512\]"),
    ([[1] * 1020], {}, "exceeds the model's max context 1024"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ([[1], [2]], {"sampling": [SamplingParams()]}, "1 SamplingParams for 2 prompts"),
])
def test_bad_input_raises(model, prompts, kwargs, message):
  cfg, params = model
  kwargs = {"max_new_tokens": 8} | kwargs
  with pytest.raises(ValueError, match=message):
    generate(params, cfg, prompts, **kwargs)


def test_random_init_is_seeded():
  cfg = tiny_config("mixtral")
  a, b, c = init_params(cfg, seed=0), init_params(cfg, seed=0), init_params(cfg, seed=1)
  np.testing.assert_array_equal(a["embed_VD"], b["embed_VD"])
  assert not np.array_equal(a["embed_VD"], c["embed_VD"])


def test_forward_last_tokens_only_equals_their_rows_of_the_full_logits(model):
  cfg, params = model
  tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 0, 0]], jnp.int32)
  positions = jnp.asarray([[0, 1, 2, 3], [0, 1, -1, -1]], jnp.int32)
  last = jnp.asarray([3, 1], jnp.int32)
  full, _ = forward(params, tokens, positions, KVCache.zeros(cfg, 2, 8), cfg=cfg)
  only, _ = forward(params, tokens, positions, KVCache.zeros(cfg, 2, 8), last, cfg=cfg)
  assert only.shape == (2, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(only), np.asarray(full)[[0, 1], [3, 1]], rtol=1e-5,
                             atol=1e-6)
