"""The workload generator: determinism, Zipf shares, Gamma gaps, bursts, lengths, JSONL."""

import dataclasses
import json

import numpy as np
import pytest

from crosspool_jax.workloads import (
  Burst,
  LengthDist,
  TraceFormatError,
  TraceRecord,
  WorkloadConfig,
  draw_bursts,
  gamma_gaps,
  generate_trace,
  model_arrivals,
  prompt_ids,
  read_jsonl,
  read_meta,
  write_jsonl,
  zipf_shares,
)

MODELS = ("m0", "m1", "m2", "m3", "m4")


def _config(**kw):
  base = dict(model_ids=MODELS, num_requests=300, total_rate=10.0, cv=2.0, zipf_exponent=1.2,
              prompt_len=LengthDist(median=40, sigma=0.8, high=1024, tail_fraction=0.1,
                                    tail_low=512, tail_high=1024),
              output_len=LengthDist(kind="uniform", low=4, high=32), random_bursts=2, seed=7)
  return WorkloadConfig(**(base | kw))


def test_same_seed_same_trace_other_seed_other_trace():
  a, b = generate_trace(_config()), generate_trace(_config())
  assert a == b
  assert [prompt_ids(r, 512) for r in a[:20]] == [prompt_ids(r, 512) for r in b[:20]]
  c = generate_trace(_config(seed=8))
  assert [r.arrival_s for r in c] != [r.arrival_s for r in a]
  # Independent streams: other lengths leave the arrival process untouched.
  d = generate_trace(_config(output_len=LengthDist(kind="constant", value=3)))
  assert [(r.arrival_s, r.model_id, r.prompt_len) for r in d] == [
      (r.arrival_s, r.model_id, r.prompt_len) for r in a]
  assert all(r.max_new_tokens == 3 for r in d)


def test_trace_is_sorted_and_sized():
  trace = generate_trace(_config())
  assert len(trace) == 300
  times = [r.arrival_s for r in trace]
  assert times == sorted(times) and times[0] >= 0
  assert {r.model_id for r in trace} <= set(MODELS)


@pytest.mark.parametrize("exponent", [0.0, 1.0, 1.5])
def test_zipf_shares_match_analytic(exponent):
  shares = zipf_shares(len(MODELS), exponent)
  np.testing.assert_allclose(shares.sum(), 1.0)
  assert np.all(np.diff(shares) <= 1e-12)
  n = 20000
  trace = generate_trace(WorkloadConfig(model_ids=MODELS, num_requests=n, total_rate=50.0,
                                        cv=1.0, zipf_exponent=exponent, seed=3))
  counts = np.array([sum(r.model_id == m for r in trace) for m in MODELS]) / n
  np.testing.assert_allclose(counts, shares, atol=0.015)


@pytest.mark.parametrize("rate, cv", [(5.0, 1.0), (2.0, 3.0), (10.0, 0.5)])
def test_gamma_gaps_mean_and_cv(rate, cv):
  gaps = gamma_gaps(np.random.default_rng(0), rate, cv, 200_000)
  assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
  assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
  # The same through the arrival process (no bursts): gaps of the arrival times.
  t = model_arrivals(np.random.default_rng(1), rate=rate, cv=cv, horizon_s=40_000 / rate)
  d = np.diff(t)
  assert d.mean() == pytest.approx(1 / rate, rel=0.05)
  assert d.std() / d.mean() == pytest.approx(cv, rel=0.08)


def test_burst_multiplies_the_rate_of_its_group_in_its_window():
  burst = Burst(models=("m1", "m2"), start_s=100.0, duration_s=50.0, factor=5.0)
  cfg = WorkloadConfig(model_ids=MODELS, num_requests=6000, total_rate=10.0, cv=1.5,
                       zipf_exponent=0.0, bursts=(burst,), seed=11)
  trace = generate_trace(cfg)
  assert trace[-1].arrival_s > 300  # the window lies well inside the trace

  def rate(models, lo, hi):
    return sum(r.model_id in models and lo <= r.arrival_s < hi for r in trace) / (hi - lo)

  base = 2.0  # per model: total_rate / 5 models, uniform popularity
  inside = rate({"m1", "m2"}, 100, 150) / 2
  outside = rate({"m1", "m2"}, 200, 300) / 2
  assert inside == pytest.approx(5 * base, rel=0.25)
  assert outside == pytest.approx(base, rel=0.25)
  others = rate({"m0", "m3", "m4"}, 100, 150) / 3
  assert others == pytest.approx(base, rel=0.3)


def test_random_bursts_are_seeded_and_in_the_fleet():
  cfg = _config(random_bursts=3, burst_group_size=2)
  a, b = draw_bursts(cfg), draw_bursts(cfg)
  assert a == b and len(a) == 3
  assert all(len(x.models) == 2 and set(x.models) <= set(MODELS) for x in a)


def test_lengths_body_tail_and_clip():
  rng = np.random.default_rng(0)
  dist = LengthDist(median=50, sigma=0.5, low=2, high=4000, tail_fraction=0.2, tail_low=1000,
                    tail_high=4000)
  x = dist.sample(rng, 50_000)
  assert x.min() >= 2 and x.max() <= 4000
  assert np.mean(x >= 1000) == pytest.approx(0.2, abs=0.01)
  body = x[x < 1000]
  assert np.median(body) == pytest.approx(50, rel=0.05)
  assert np.all(LengthDist(kind="constant", value=9).sample(rng, 5) == 9)
  u = LengthDist(kind="uniform", low=3, high=5).sample(rng, 1000)
  assert set(u.tolist()) == {3, 4, 5}


def test_prompt_ids_deterministic_in_vocab_and_explicit():
  r = TraceRecord(arrival_s=0.0, model_id="m0", prompt_len=64, max_new_tokens=4, seed=5)
  ids = prompt_ids(r, 100, low=3)
  assert ids == prompt_ids(r, 100, low=3) and len(ids) == 64
  assert min(ids) >= 3 and max(ids) < 100
  assert prompt_ids(dataclasses.replace(r, seed=6), 100) != prompt_ids(r, 100)
  explicit = TraceRecord(arrival_s=0.0, model_id="m0", prompt_len=3, max_new_tokens=4, seed=5,
                         prompt_ids=[7, 8, 9])
  assert prompt_ids(explicit, 100) == [7, 8, 9]
  with pytest.raises(ValueError, match="vocab_size"):
    prompt_ids(r, 0)


def test_jsonl_round_trip(tmp_path):
  trace = generate_trace(_config(num_requests=50))
  trace.append(TraceRecord(arrival_s=99.0, model_id="m1", prompt_len=2, max_new_tokens=1,
                           seed=0, prompt_ids=(4, 5)))
  path = tmp_path / "t.jsonl"
  write_jsonl(path, trace, meta={"seed": 7})
  assert read_jsonl(path) == trace
  assert read_meta(path) == {"seed": 7}
  write_jsonl(path, trace)
  assert read_jsonl(path) == trace and read_meta(path) is None


@pytest.mark.parametrize("line, error", [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"arrival_s": 1, "model_id": "a", "prompt_len": 2, "max_new_tokens": 1}', "missing"),
    ('{"arrival_s": -1, "model_id": "a", "prompt_len": 2, "max_new_tokens": 1, "seed": 0}',
     "arrival_s must be"),
    ('{"arrival_s": 1, "model_id": "a", "max_new_tokens": 1, "seed": 0}',
     "needs prompt_len or prompt_ids"),
    ('{"arrival_s": 1, "model_id": "a", "prompt_len": 0, "max_new_tokens": 1, "seed": 0}',
     "prompt_len must be"),
    ('{"arrival_s": 1, "model_id": "a", "prompt_len": 3, "max_new_tokens": 1, "seed": 0, '
     '"prompt_ids": [1, 2]}', "prompt_ids has 2 tokens but prompt_len is 3"),
    ('{"arrival_s": 1, "model_id": "a", "prompt_len": 2, "max_new_tokens": 1, "seed": 0, '
     '"colour": 1}', "unknown field"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, error):
  good = json.dumps({"arrival_s": 0.0, "model_id": "a", "prompt_len": 2, "max_new_tokens": 1,
                     "seed": 0})
  path = tmp_path / "bad.jsonl"
  path.write_text(f"{good}\n\n{line}\n")
  with pytest.raises(TraceFormatError, match=f"bad.jsonl:3: .*{error}"):
    read_jsonl(path)


@pytest.mark.parametrize("kwargs, error", [
    ({"total_rate": -1.0}, "total_rate must be a finite number > 0"),
    ({"total_rate": 0.0}, "total_rate must be a finite number > 0"),
    ({"cv": 0.0}, "cv must be a finite number > 0"),
    ({"cv": -2.0}, "cv must be a finite number > 0"),
    ({"zipf_exponent": -1.0}, "zipf_exponent must be"),
    ({"num_requests": 0}, "num_requests must be"),
    ({"model_ids": ()}, "model_ids must be a non-empty"),
    ({"model_ids": ("a", "a")}, "duplicates"),
    ({"bursts": (Burst(("zz",), 0.0, 1.0, 2.0),)}, r"burst models \['zz'\] are not in"),
    ({"random_bursts": 1, "burst_group_size": 9}, "burst_group_size must be"),
    ({"prompt_len": {"kind": "lognormal"}}, "prompt_len must be a LengthDist"),
])
def test_bad_config_is_rejected(kwargs, error):
  with pytest.raises(ValueError, match=error):
    _config(**kwargs)


@pytest.mark.parametrize("kwargs, error", [
    ({"kind": "pareto"}, "kind must be one of"),
    ({"kind": "uniform"}, "uniform length needs high"),
    ({"median": 0.0}, "median must be"),
    ({"sigma": -1.0}, "sigma must be"),
    ({"tail_fraction": 1.5}, r"tail_fraction must be in \[0, 1\]"),
    ({"tail_fraction": 0.1}, "tail_low <= tail_high"),
    ({"low": 0}, "low must be an integer >= 1"),
    ({"low": 5, "high": 4}, "high must be 0"),
])
def test_bad_length_dist_is_rejected(kwargs, error):
  with pytest.raises(ValueError, match=error):
    LengthDist(**kwargs)


@pytest.mark.parametrize("kwargs, error", [
    ({"models": ()}, "non-empty"),
    ({"models": "m0"}, "non-empty list"),
    ({"duration_s": 0.0}, "duration_s must be"),
    ({"factor": -2.0}, "factor must be"),
    ({"start_s": -1.0}, "start_s must be"),
])
def test_bad_burst_is_rejected(kwargs, error):
  with pytest.raises(ValueError, match=error):
    Burst(**({"models": ("m0",), "start_s": 0.0, "duration_s": 1.0, "factor": 2.0} | kwargs))
