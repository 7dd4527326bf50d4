"""scripts/run_experiment.py and make_benchmarks.py end to end (subprocesses, the smoke demo)."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from crosspool_jax.experiments.runner import (
    check_experiment,
    run_config,
    run_names,
    without_wall_clock,
)
from crosspool_jax.experiments.serving import fleet_model_config, load_trace
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.models.sampling import SamplingParams
from crosspool_jax.workloads import prompt_ids, read_jsonl
from tests.conftest import ROOT

CONFIGS = os.path.join(ROOT, "configs", "experiments")
DEMO = os.path.join(CONFIGS, "demo.py")
SMOKE = f"--config={DEMO}:smoke"


def experiment_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def demo_config(arg):
  return experiment_config("demo.py", arg)


def _run(script, *args, ok=True):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                        capture_output=True, text=True, timeout=900, cwd=ROOT)
  if ok:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """The smoke demo run twice with the same seed (each with a profiler trace of 2 steps)."""
  out = []
  for name in ("a", "b"):
    workdir = tmp_path_factory.mktemp(name)
    proc = _run("run_experiment.py", SMOKE, f"--workdir={workdir}",
                f"--profile_dir={workdir / 'profile'}", "--profile_steps=2")
    with open(workdir / "results.json") as f:
      out.append((workdir, proc, json.load(f)))
  return out


def test_same_seed_same_results_apart_from_wall_clock(two_runs):
  (dir_a, _, a), (dir_b, _, b) = two_runs
  assert a["command"].replace(str(dir_a), str(dir_b)) == b["command"]  # only --workdir
  assert without_wall_clock(a | {"command": ""}) == without_wall_clock(b | {"command": ""})
  assert a["created"] and a["runs"][0]["wall_clock"]["serve_wall_s"] > 0  # they did exist
  assert "wall_clock" not in json.dumps(without_wall_clock(a))


def test_results_hold_every_policy_and_what_it_served(two_runs):
  workdir, proc, r = two_runs[0]
  assert [run["name"] for run in r["runs"]] == ["static", "shared", "crosspool"]
  assert r["git_revision"] and r["seed"] == 0 and r["config"]["name"] == "demo"
  assert "run_experiment.py" in r["command"]
  by = {run["name"]: run for run in r["runs"]}
  for run in r["runs"]:
    c, w = run["counts"], run["wall_clock"]
    assert c["finished"] + c["rejected"] == c["requests"] == 8
    assert c["backend_compiles_after_start"] == 0
    assert len(c["kv_used_pages_per_step"]) == c["steps"] > 0
    assert c["kv_used_pages_per_step"][-1] == 0  # every page returned
    # Usable pages: each KV device's null page excluded, the same count on every screen.
    usable_per_device = run["engine"]["pages_per_device"] - 1
    kv_devices = 2  # crosspool: its KV devices; static, shared: the groups of the two models
    assert c["kv_capacity_pages"] == kv_devices * usable_per_device
    assert f"of {c['kv_capacity_pages']} usable pages" in proc.stderr  # the progress line
    for key in ("ttft_s", "tbt_s"):
      assert 0 < w[key]["p50"] <= w[key]["p90"] <= w[key]["p99"]
    assert w["output_tokens_per_s"] > 0 and 0 <= w["slo_attainment"] <= 1
  # The budget decides who can hold the long-context tail: the smoke trace has prompts of
  # ~420 and ~620 tokens; static caps contexts at its reservation, shared at one device.
  assert by["static"]["counts"]["rejected"] > by["shared"]["counts"]["rejected"] >= \
      by["crosspool"]["counts"]["rejected"] == 0
  assert by["crosspool"]["counts"]["longest_context_served"] > \
      by["shared"]["counts"]["longest_context_served"]
  assert by["crosspool"]["counts"]["expert_hit_rate"] is not None
  assert by["static"]["plan"]["max_context"]["mixtral_0"] < 1024
  # Seeded sampling: every policy gives every request the same tokens.
  assert r["outputs_agree"][""] == {"compared": 5, "same": 5, "all_same": True}
  for png in ("latency_cdf.png", "memory.png", "activity.png", "pipeline.png"):
    assert os.path.getsize(workdir / png) > 1000
  for run in r["runs"]:  # the median recorded step of every run, and its profiler trace
    step = run["wall_clock"]["pipeline_step"]
    assert step["recorded_steps"] >= 1 and step["events"][0]["start_s"] == 0.0
    kinds = {e["kind"] for e in step["events"]}
    if run["name"] == "crosspool":
      assert {"experts", "transfer_to_weights", "transfer_back"} <= kinds  # which step
      assert kinds & {"attention_side", "attention"}  # is the median depends on the clock
    else:
      assert kinds == {"model_step"}
    trace = glob.glob(str(workdir / "profile" / run["name"] / "plugins" / "profile" / "*"))
    assert len(trace) == 1 and glob.glob(os.path.join(trace[0], "*.xplane.pb"))
    assert f"{run['name']}: profiler trace of 2 steps" in proc.stderr
  assert "crosspool" in proc.stdout and "TBT ms p50/90/99" in proc.stdout
  assert ("Same output tokens under every policy: yes, for all 5 requests that every policy "
          "finished.") in proc.stdout
  assert "The crosspool run won on memory" in proc.stdout  # the generated summary
  shared_pages = by["shared"]["engine"]["pages_per_device"] - 1  # one device per KV group
  rejection = by["shared"]["counts"]["rejections"][0]["reason"]
  assert rejection.endswith(f"more than the pool's {shared_pages} usable KV pages (1 KV "
                            f"device(s) x {shared_pages} per device, null pages excluded)")
  assert "== run 3/3: crosspool" in proc.stderr  # progress


def test_outputs_equal_the_reference_generation(two_runs):
  """The experiment serves real models: its tokens are those of `generate` alone."""
  workdir, _, r = two_runs[0]
  with open(workdir / "outputs.json") as f:
    outputs = json.load(f)
  records = read_jsonl(workdir / "trace.jsonl")
  assert len(records) == r["traces"][""]["stats"]["requests"] == 8
  s, fleet = r["config"]["sampling"], r["traces"][""]["fleet"]  # the fleet as served
  checked = 0
  for i, rec in enumerate(records[:4]):  # two long prompts static rejects, two short ones
    entry = fleet[rec.model_id]
    cfg = tiny_config(entry["family"], **entry["overrides"])
    want = generate(init_params(cfg, seed=entry["seed"]), cfg,
                    [prompt_ids(rec, cfg.vocab_size, low=r["config"]["workload"]["prompt_low"])],
                    max_new_tokens=rec.max_new_tokens,
                    sampling=SamplingParams(temperature=s["temperature"], top_k=s["top_k"],
                                            top_p=s["top_p"], seed=rec.seed))[0]
    for run in ("crosspool", "shared", "static"):
      got = outputs[f"{run}@"].get(f"r{i:05d}")  # finished requests only
      if got is not None:
        assert got == want, (run, i)
        checked += 1
  assert checked >= 8


def test_benchmarks_md_is_generated_from_the_results(two_runs, tmp_path):
  workdir, _, r = two_runs[0]
  out = tmp_path / "B.md"
  _run("make_benchmarks.py", f"--results={workdir / 'results.json'}", f"--out={out}")
  text = out.read_text()
  assert "## demo (smoke)" in text and r["command"] in text
  assert "| crosspool |" in text and "| static |" in text
  assert r["git_revision"][:12] in text
  bad = _run("make_benchmarks.py", f"--results={tmp_path / 'missing.json'}", f"--out={out}",
             ok=False)
  assert bad.returncode != 0 and "missing.json" in bad.stderr


@pytest.mark.parametrize("override, error", [
    ("--config.policies.shared.weight_devices=2,3", "a shared engine has no weights devices"),
    ("--config.sweep.field=workload.total_rate", "config.sweep.points is empty"),
    ("--config.budget.device_bytes=100000",
     "config.policies.crosspool: budget: crosspool: model 'mixtral_0' does not fit: weights "
     "369920 B do not fit on one device of 100000 B"),
])
def test_bad_config_fails_before_compiling(tmp_path, override, error):
  proc = _run("run_experiment.py", SMOKE, f"--workdir={tmp_path}", override, ok=False)
  assert proc.returncode != 0 and error in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "results.json")


def test_runs_are_served_baselines_first():
  assert run_names(demo_config("smoke")) == ["static", "shared", "crosspool"]
  assert run_names(experiment_config("ablations.py", "cpu")) == [
      "no_weights_pool", "crosspool", "no_fusion", "no_pipeline", "no_swapping",
      "no_consolidation"]


def test_unknown_engine_field_in_a_policy_is_named():
  config = demo_config("smoke")
  config.policies.static.kv_polcy = "static"
  with pytest.raises(ValueError, match=r"policies.static overrides unknown engine fields "
                                       r"\['kv_polcy'\]"):
    check_experiment(config)


def test_paper_tbt_bursts_fit_one_device_alone_but_not_together():
  """The paper_tbt design, checked on its own trace and the policies' plans: every request
  fits its model's one-device pool under shared alone (nothing is rejected for length), but
  each model's largest max_batch requests together do not (its burst must preempt or queue),
  while they fit crosspool's pooled KV."""
  config = experiment_config("paper_tbt.py", "cpu")
  check_experiment(config)
  records, _ = load_trace(config)
  by_model = {}
  for r in records:
    by_model.setdefault(r.model_id, []).append(r.prompt_len + r.max_new_tokens)
  assert set(by_model) == set(config.fleet.keys())

  def tokens_held(policy, m, devices):  # tokens of model m that `devices` KV buffers hold
    c, plan = run_config(config, policy)
    cfg = fleet_model_config(c.fleet[m])
    page_tokens = c.engine.page_elems // (2 * cfg.num_kv_heads * cfg.head_dim)
    return devices * (plan.pages_per_device - 1) // cfg.num_layers * page_tokens

  for m, contexts in by_model.items():
    top = sum(sorted(contexts)[-config.fleet[m].max_batch:])
    assert max(contexts) <= tokens_held("shared", m, 1) < top
    assert top <= tokens_held("crosspool", m, 2)
