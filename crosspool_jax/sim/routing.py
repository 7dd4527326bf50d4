"""Which experts a batch's tokens route to in the simulator (seeded; no model runs).

A real router decides from its input, which a config does not say, so the simulator draws:
each token picks top_k distinct experts of its layer, expert e with weight w_e, by weighted
sampling without replacement (Efraimidis-Spirakis: the top_k largest log(u) / w_e of uniform
u). `uniform`: every w_e = 1 (each k-subset equally likely); `zipf`: w_e = rank_e^-exponent,
the ranks a seeded permutation per (model, layer), so each layer has its own hot experts.
Invariant: the draws of a (model, layer) come from its own stream, seeded by (seed, model id,
layer): a run repeats exactly for a seed.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from crosspool_jax.models.config import ModelConfig

ROUTING_KINDS = ("uniform", "zipf")


@dataclasses.dataclass(frozen=True)
class Routing:
  """The routing model: `kind` ("uniform" or "zipf"), the Zipf `exponent`, the `seed`."""

  kind: str = "uniform"
  exponent: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.kind not in ROUTING_KINDS:
      raise ValueError(f"routing.kind must be one of {ROUTING_KINDS}, got {self.kind!r}")
    if not (isinstance(self.exponent, int | float) and self.exponent >= 0):
      raise ValueError(f"routing.exponent must be a number >= 0, got {self.exponent!r}")
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"routing.seed must be an integer >= 0, got {self.seed!r}")


class Router:
  """Draws the distinct experts a layer's tokens route to (see the module docstring)."""

  def __init__(self, routing: Routing):
    self.routing = routing
    self._streams: dict[tuple[str, int], tuple[np.random.Generator, np.ndarray]] = {}

  def _stream(self, model_id: str, cfg: ModelConfig, layer: int):
    key = (model_id, layer)
    if key not in self._streams:
      seed = [self.routing.seed, zlib.crc32(model_id.encode()), layer]
      weights_E = np.ones(cfg.num_experts)
      if self.routing.kind == "zipf":
        ranks_E = np.random.default_rng([*seed, 0]).permutation(cfg.num_experts) + 1
        weights_E = ranks_E.astype(np.float64) ** -self.routing.exponent
      self._streams[key] = (np.random.default_rng([*seed, 1]), weights_E)
    return self._streams[key]

  def experts(self, model_id: str, cfg: ModelConfig, layer: int, tokens: int) -> np.ndarray:
    """The distinct experts (sorted ids) `tokens` tokens of the layer route to."""
    rng, weights_E = self._stream(model_id, cfg, layer)
    keys_TE = np.log1p(-rng.random((tokens, cfg.num_experts))) / weights_E  # log(u), u in (0, 1]
    top_TK = np.argpartition(-keys_TE, cfg.top_k - 1, axis=1)[:, :cfg.top_k]
    return np.unique(top_TK)
