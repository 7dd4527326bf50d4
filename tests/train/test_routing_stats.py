"""Routing statistics by hand: load, entropy, predictability, hot-expert overlap."""

import math

import numpy as np
import pytest

from crosspool_jax.train.routing_stats import (
  chance_overlap,
  hot_overlap,
  model_stats,
  predictability,
)


def test_predictability_of_a_deterministic_next_layer():
  rng = np.random.default_rng(0)
  cur = np.stack([rng.permutation(8)[:2] for _ in range(400)])
  nxt = (cur + 3) % 8  # the next layer's experts are a function of the current ones
  p = predictability(cur, nxt, 8)
  assert p["cooccurrence"] == 1.0 and p["chance"] == 0.25
  assert p["popularity"] < 0.5  # the experts are equally popular: popularity cannot tell


def test_predictability_of_an_independent_next_layer_is_popularity():
  rng = np.random.default_rng(1)
  cur = np.stack([rng.permutation(8)[:2] for _ in range(2000)])
  nxt = np.stack([[0, 1 + rng.integers(7)] for _ in range(2000)])  # expert 0 always chosen
  p = predictability(cur, nxt, 8)
  assert p["popularity"] >= 0.5 and p["cooccurrence"] == pytest.approx(p["popularity"], abs=0.05)


def test_model_stats_by_hand():
  # Layer 0: every token picks experts 0 and 1; layer 1: tokens spread over all 4.
  ids = np.array([[[0, 1]] * 4, [[0, 1], [2, 3], [0, 2], [1, 3]]])
  s = model_stats(ids, 4)
  assert s["layers"][0]["load"] == [0.5, 0.5, 0, 0]
  assert s["layers"][0]["entropy"] == pytest.approx(math.log(2) / math.log(4))
  assert s["layers"][1]["entropy"] == pytest.approx(1.0)
  assert s["layers"][0]["hot_share"] == 0.5 and s["layers"][1]["hot_share"] == 0.25
  assert s["entropy"] == pytest.approx(0.75)
  assert len(s["predictability"]["layers"]) == 1


def test_hot_overlap_and_its_chance():
  a = {"layers": [{"load": [0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]}]}
  b = {"layers": [{"load": [0.4, 0.02, 0.3, 0.1, 0.05, 0.05, 0.05, 0.03]}]}
  assert hot_overlap(a, a) == 1.0
  assert hot_overlap(a, b) == pytest.approx(1 / 3)  # hot {0, 1} vs {0, 2}
  assert chance_overlap(8) == pytest.approx(5 / 28)  # two random pairs of 8 experts
  rng = np.random.default_rng(0)
  draws = [len(set(rng.permutation(16)[:4]) & set(rng.permutation(16)[:4])) for _ in range(20000)]
  assert chance_overlap(16) == pytest.approx(np.mean([i / (8 - i) for i in draws]), abs=0.01)
