"""Seeded synthetic traces of a cold multi-model fleet: skewed popularity, bursty arrivals,
long-context tails.

Zipf popularity, per-model Gamma renewal arrivals with a common CV, correlated bursts (`Burst`),
body + long-tail lengths (`LengthDist`); numpy only (no JAX). Invariant: every draw comes from one
`np.random.Generator` seeded by `seed`, split into independent child streams (arrivals per
model, bursts, lengths, seeds), so the same arguments give the same trace, and changing e.g. the
length distribution leaves the arrival times unchanged. The traffic model: WORKSPACE.md,
"Workloads".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from crosspool_jax.workloads.trace import TraceRecord

LENGTH_KINDS = ("constant", "uniform", "lognormal")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
  ok = (isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
  if not ok:
    raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                     f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class LengthDist:
  """A distribution of token counts (prompt or output lengths), clipped to [low, high].

  Attributes:
    kind: "constant" (always `value`), "uniform" (integers in [low, high]) or "lognormal"
      (median `median`, log-space standard deviation `sigma`).
    value: the constant length (kind "constant").
    median, sigma: lognormal body parameters.
    low, high: every draw is clipped to [low, high] (the body and the tail); high = 0 means
      no upper clip.
    tail_fraction: probability in [0, 1] that a draw comes from the long-context tail instead.
    tail_low, tail_high: the tail range; tail lengths are log-uniform in [tail_low, tail_high].
  """

  kind: str = "lognormal"
  value: int = 32
  median: float = 32.0
  sigma: float = 0.5
  low: int = 1
  high: int = 0
  tail_fraction: float = 0.0
  tail_low: int = 0
  tail_high: int = 0

  def __post_init__(self):
    if self.kind not in LENGTH_KINDS:
      raise ValueError(f"kind must be one of {LENGTH_KINDS}, got {self.kind!r}")
    if not isinstance(self.low, int) or self.low < 1:
      raise ValueError(f"low must be an integer >= 1, got {self.low!r}")
    if not isinstance(self.high, int) or (self.high and self.high < self.low):
      raise ValueError(f"high must be 0 (no clip) or an integer >= low={self.low}, "
                       f"got {self.high!r}")
    if self.kind == "constant" and (not isinstance(self.value, int) or self.value < 1):
      raise ValueError(f"value must be an integer >= 1, got {self.value!r}")
    if self.kind == "uniform" and not self.high:
      raise ValueError("a uniform length needs high > 0")
    if self.kind == "lognormal":
      _check_positive("median", self.median)
      _check_positive("sigma", self.sigma, allow_zero=True)
    if not (isinstance(self.tail_fraction, int | float) and 0 <= self.tail_fraction <= 1):
      raise ValueError(f"tail_fraction must be in [0, 1], got {self.tail_fraction!r}")
    if self.tail_fraction > 0 and not (isinstance(self.tail_low, int)
                                       and isinstance(self.tail_high, int)
                                       and 1 <= self.tail_low <= self.tail_high):
      raise ValueError("tail_fraction > 0 needs integers 1 <= tail_low <= tail_high, got "
                       f"tail_low={self.tail_low!r}, tail_high={self.tail_high!r}")

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """n integer lengths (int64) drawn with `rng`."""
    if self.kind == "constant":
      body = np.full(n, float(self.value))
    elif self.kind == "uniform":
      body = rng.integers(self.low, self.high + 1, size=n).astype(np.float64)
    else:
      body = self.median * np.exp(self.sigma * rng.standard_normal(n))
    is_tail = rng.random(n) < self.tail_fraction
    if self.tail_fraction > 0:
      tail = np.exp(rng.uniform(math.log(self.tail_low), math.log(self.tail_high + 1), size=n))
      body = np.where(is_tail, np.minimum(np.floor(tail), self.tail_high), body)
    out = np.maximum(np.rint(body), self.low)
    if self.high:
      out = np.minimum(out, self.high)
    return out.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Burst:
  """A correlated burst: the listed models run `factor` times their rate in a window.

  Attributes:
    models: model ids in the burst group.
    start_s: window start (seconds from the trace start, >= 0).
    duration_s: window length (> 0).
    factor: rate multiplier inside the window (> 0; < 1 makes a lull).
  """

  models: tuple[str, ...]
  start_s: float
  duration_s: float
  factor: float

  def __post_init__(self):
    if isinstance(self.models, str) or not self.models:
      raise ValueError(f"burst models must be a non-empty list of model ids, got "
                       f"{self.models!r}")
    object.__setattr__(self, "models", tuple(self.models))
    _check_positive("burst start_s", self.start_s, allow_zero=True)
    _check_positive("burst duration_s", self.duration_s)
    _check_positive("burst factor", self.factor)


def zipf_shares(num_models: int, exponent: float) -> np.ndarray:
  """Share of the total rate of each popularity rank: r^-exponent normalised (rank 1 first)."""
  if not isinstance(num_models, int) or num_models < 1:
    raise ValueError(f"num_models must be an integer >= 1, got {num_models!r}")
  _check_positive("zipf_exponent", exponent, allow_zero=True)
  w = np.arange(1, num_models + 1, dtype=np.float64) ** -float(exponent)
  return w / w.sum()


def gamma_gaps(rng: np.random.Generator, rate: float, cv: float, n: int) -> np.ndarray:
  """n inter-arrival gaps of a Gamma renewal process: mean 1/rate, coefficient of variation cv."""
  _check_positive("rate", rate)
  _check_positive("cv", cv)
  shape = 1.0 / cv**2
  return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def _operational_time(bursts: Sequence[Burst]):
  """Maps of t <-> tau = integral_0^t m(u) du for a piecewise-constant multiplier m."""
  edges = sorted({0.0} | {b.start_s for b in bursts} | {b.start_s + b.duration_s for b in bursts})
  mult = []
  for lo in edges:
    m = 1.0
    for b in bursts:
      if b.start_s <= lo < b.start_s + b.duration_s:
        m *= b.factor
    mult.append(m)
  t_edges = np.asarray(edges)
  tau_edges = np.concatenate([[0.0], np.cumsum(np.diff(t_edges) * np.asarray(mult[:-1]))])

  def to_t(tau: np.ndarray) -> np.ndarray:
    i = np.searchsorted(tau_edges, tau, side="right") - 1
    return t_edges[i] + (tau - tau_edges[i]) / np.asarray(mult)[i]

  def to_tau(t: float) -> float:
    i = int(np.searchsorted(t_edges, t, side="right") - 1)
    return float(tau_edges[i] + (t - t_edges[i]) * mult[i])

  return to_t, to_tau


def model_arrivals(rng: np.random.Generator, *, rate: float, cv: float, horizon_s: float,
                   bursts: Sequence[Burst] = ()) -> np.ndarray:
  """Arrival times in [0, horizon_s) of one model's Gamma renewal process under its bursts.

  Args:
    rng: the model's own generator.
    rate: base requests per second (> 0).
    cv: coefficient of variation of the gaps (> 0).
    horizon_s: end of the time window (> 0).
    bursts: the bursts that include this model (their windows may overlap: factors multiply).
  """
  _check_positive("horizon_s", horizon_s)
  to_t, to_tau = _operational_time(bursts)
  tau_end = to_tau(horizon_s)
  chunk = max(16, int(1.5 * rate * tau_end) + 16)
  taus = np.cumsum(gamma_gaps(rng, rate, cv, chunk))
  while taus[-1] < tau_end:
    taus = np.concatenate([taus, taus[-1] + np.cumsum(gamma_gaps(rng, rate, cv, chunk))])
  taus = taus[taus < tau_end]
  return to_t(taus)


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
  """What `generate_trace` draws (see the module docstring for the traffic model).

  Attributes:
    model_ids: the fleet in popularity order (rank 1 first).
    num_requests: length of the trace (the first num_requests arrivals).
    total_rate: requests per second over the whole fleet, outside bursts (> 0).
    cv: coefficient of variation of every model's inter-arrival gaps (> 0; 1 = Poisson).
    zipf_exponent: popularity skew (>= 0; 0 = every model equally popular).
    prompt_len: prompt length distribution.
    output_len: max_new_tokens distribution.
    bursts: explicit correlated bursts.
    random_bursts: number of extra bursts drawn from the seed, each over `burst_group_size`
      models picked at random, `burst_duration_s` long, starting uniformly in the trace's
      expected span (num_requests / total_rate), at `burst_factor` times the rate.
    burst_group_size, burst_duration_s, burst_factor: shape of the random bursts.
    seed: the seed of everything.
  """

  model_ids: tuple[str, ...]
  num_requests: int = 100
  total_rate: float = 4.0
  cv: float = 1.0
  zipf_exponent: float = 1.0
  prompt_len: LengthDist = LengthDist()
  output_len: LengthDist = LengthDist(kind="constant", value=16)
  bursts: tuple[Burst, ...] = ()
  random_bursts: int = 0
  burst_group_size: int = 2
  burst_duration_s: float = 5.0
  burst_factor: float = 4.0
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.model_ids, str) or not self.model_ids:
      raise ValueError(f"model_ids must be a non-empty list of model ids, got "
                       f"{self.model_ids!r}")
    object.__setattr__(self, "model_ids", tuple(self.model_ids))
    if len(set(self.model_ids)) != len(self.model_ids):
      raise ValueError(f"model_ids has duplicates: {self.model_ids}")
    if not isinstance(self.num_requests, int) or self.num_requests < 1:
      raise ValueError(f"num_requests must be an integer >= 1, got {self.num_requests!r}")
    _check_positive("total_rate", self.total_rate)
    _check_positive("cv", self.cv)
    _check_positive("zipf_exponent", self.zipf_exponent, allow_zero=True)
    for name in ("prompt_len", "output_len"):
      if not isinstance(getattr(self, name), LengthDist):
        raise ValueError(f"{name} must be a LengthDist, got {getattr(self, name)!r}")
    object.__setattr__(self, "bursts", tuple(self.bursts))
    for b in self.bursts:
      if not isinstance(b, Burst):
        raise ValueError(f"bursts must be Burst objects, got {b!r}")
      unknown = sorted(set(b.models) - set(self.model_ids))
      if unknown:
        raise ValueError(f"burst models {unknown} are not in model_ids")
    if not isinstance(self.random_bursts, int) or self.random_bursts < 0:
      raise ValueError(f"random_bursts must be an integer >= 0, got {self.random_bursts!r}")
    if self.random_bursts:
      if not (isinstance(self.burst_group_size, int)
              and 1 <= self.burst_group_size <= len(self.model_ids)):
        raise ValueError(f"burst_group_size must be an integer in [1, {len(self.model_ids)}], "
                         f"got {self.burst_group_size!r}")
      _check_positive("burst_duration_s", self.burst_duration_s)
      _check_positive("burst_factor", self.burst_factor)
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

  def rates(self) -> dict[str, float]:
    """Base request rate of each model (outside bursts)."""
    shares = zipf_shares(len(self.model_ids), self.zipf_exponent)
    return {m: float(self.total_rate * s) for m, s in zip(self.model_ids, shares, strict=True)}


def draw_bursts(config: WorkloadConfig) -> tuple[Burst, ...]:
  """The explicit bursts plus `random_bursts` drawn from the seed (deterministic)."""
  rng = np.random.default_rng([config.seed, 1])
  span = config.num_requests / config.total_rate
  drawn = []
  for _ in range(config.random_bursts):
    group = rng.choice(len(config.model_ids), size=config.burst_group_size, replace=False)
    drawn.append(Burst(models=tuple(config.model_ids[i] for i in sorted(group)),
                       start_s=float(rng.uniform(0, span)),
                       duration_s=config.burst_duration_s, factor=config.burst_factor))
  return config.bursts + tuple(drawn)


def generate_trace(config: WorkloadConfig) -> list[TraceRecord]:
  """The first `num_requests` arrivals of the fleet, sorted by time (ties: popularity rank).

  Each record gets its prompt length, output length and a request seed from independent
  streams; prompt ids are derived from the seed by `trace.prompt_ids`.
  """
  bursts = draw_bursts(config)
  rates = config.rates()
  horizon = 2.0 * config.num_requests / config.total_rate + 1.0
  while True:
    times, ranks = [], []
    for i, m in enumerate(config.model_ids):
      rng = np.random.default_rng([config.seed, 2, i])  # the model's own stream, every try
      t = model_arrivals(rng, rate=rates[m], cv=config.cv, horizon_s=horizon,
                         bursts=[b for b in bursts if m in b.models])
      times.append(t)
      ranks.append(np.full(t.size, i))
    all_t, all_r = np.concatenate(times), np.concatenate(ranks)
    if all_t.size >= config.num_requests:
      break
    horizon *= 2
  order = np.lexsort((all_r, all_t))[:config.num_requests]
  n = config.num_requests
  prompt = config.prompt_len.sample(np.random.default_rng([config.seed, 3]), n)
  output = config.output_len.sample(np.random.default_rng([config.seed, 4]), n)
  seeds = np.random.default_rng([config.seed, 5]).integers(0, 2**31, size=n)
  return [TraceRecord(arrival_s=float(all_t[j]), model_id=config.model_ids[int(all_r[j])],
                      prompt_len=int(prompt[k]), max_new_tokens=int(output[k]),
                      seed=int(seeds[k]))
          for k, j in enumerate(order)]


def trace_stats(records: Sequence[TraceRecord]) -> dict:
  """Counts per model, span, total rate, and prompt/output length percentiles of a trace."""
  if not records:
    return {"requests": 0}
  arr = np.array([r.arrival_s for r in records])
  per_model: dict[str, int] = {}
  for r in records:
    per_model[r.model_id] = per_model.get(r.model_id, 0) + 1

  def pct(values):
    v = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
            "max": int(v.max())}

  span = float(arr.max() - arr.min())
  return {"requests": len(records), "span_s": span,
          "rate_per_s": (len(records) - 1) / span if span > 0 else None,
          "per_model": dict(sorted(per_model.items(), key=lambda kv: -kv[1])),
          "prompt_len": pct([r.prompt_len for r in records]),
          "max_new_tokens": pct([r.max_new_tokens for r in records])}
