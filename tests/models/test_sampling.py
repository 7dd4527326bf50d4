"""Sampler: greedy, temperature, top-k, top-p against hand-computed distributions; seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.models.sampling import SamplingParams, sample, stack_params

DRAWS = 4000
FREQ_ATOL = 0.03  # ~4 sigma of a Bernoulli frequency over 4000 draws


def _draw(logits_V, params: SamplingParams, draws=DRAWS):
  """Samples `draws` tokens from the same logits with seeds params.seed + row."""
  rows = [SamplingParams(params.temperature, params.top_k, params.top_p, params.seed + i)
          for i in range(draws)]
  arrays = {k: jnp.asarray(v) for k, v in stack_params(rows).items()}
  logits = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (draws, len(logits_V)))
  out = jax.jit(sample)(logits, jnp.full((draws,), 7, jnp.int32), **arrays)
  return np.bincount(np.asarray(out), minlength=len(logits_V)) / draws


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (16, 50))
  arrays = {k: jnp.asarray(v) for k, v in stack_params([SamplingParams()] * 16).items()}
  out = sample(logits, jnp.zeros(16, jnp.int32), **arrays)
  np.testing.assert_array_equal(out, np.argmax(logits, -1))


def test_greedy_ties_pick_the_lowest_index():
  logits = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -3.0]],
                    np.float32)
  arrays = {k: jnp.asarray(v) for k, v in stack_params([SamplingParams()] * 3).items()}
  out = sample(jnp.asarray(logits), jnp.zeros(3, jnp.int32), **arrays)
  np.testing.assert_array_equal(out, np.argmax(logits, -1))  # numpy: the first maximum


def test_temperature_matches_softmax():
  logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  freq = _draw(logits, SamplingParams(temperature=0.7))
  np.testing.assert_allclose(freq, jax.nn.softmax(logits / 0.7), atol=FREQ_ATOL)


def test_top_k_restricts_support_and_renormalises():
  logits = np.array([0.1, 2.0, -1.0, 1.5, 1.4, 0.0])
  freq = _draw(logits, SamplingParams(temperature=1.0, top_k=3))
  expected = np.zeros(6)
  expected[[1, 3, 4]] = jax.nn.softmax(logits[[1, 3, 4]])
  np.testing.assert_allclose(freq, expected, atol=FREQ_ATOL)
  assert freq[[0, 2, 5]].sum() == 0


def test_top_p_keeps_smallest_prefix_reaching_p():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  # Mass before each rank: 0, .5, .8, .95 -> top_p=0.7 keeps ranks 0 and 1.
  freq = _draw(np.log(probs), SamplingParams(temperature=1.0, top_p=0.7))
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=FREQ_ATOL)


def test_top_k_one_is_greedy():
  logits = np.array([0.3, 0.2, 0.9, 0.1])
  assert _draw(logits, SamplingParams(temperature=2.0, top_k=1), draws=200)[2] == 1.0


@pytest.mark.parametrize("mixed", [False, True])
def test_seeded_sample_does_not_depend_on_batch(mixed):
  # mixed: greedy, untruncated and truncated rows side by side, so a row alone takes other
  # branches of the sampler than in the batch (all greedy skips the draws, no truncation the sort).
  logits = jax.random.normal(jax.random.key(1), (8, 100))
  kinds = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=5),
           dict(temperature=1.0, top_p=0.9)]
  params = [SamplingParams(**(kinds[i % 4] if mixed else dict(temperature=1.0, top_p=0.9)),
                           seed=100 + i) for i in range(8)]
  arrays = {k: jnp.asarray(v) for k, v in stack_params(params).items()}
  positions = jnp.arange(8, dtype=jnp.int32) + 5
  batched = sample(logits, positions, **arrays)
  for i in range(8):
    alone = {k: v[i:i + 1] for k, v in arrays.items()}
    assert sample(logits[i:i + 1], positions[i:i + 1], **alone)[0] == batched[i]


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"),
])
def test_invalid_params_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    SamplingParams(**kwargs)
