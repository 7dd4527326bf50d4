"""pipeline.png and the profiler flag: the representative step, the plot from results alone,
the colocated executor's timeline, and `--profile_dir` writing a trace (serve.py, runlocal)."""

from __future__ import annotations

import copy
import glob
import itertools
import os
import subprocess
import sys

from crosspool_jax.engine import Engine, EngineConfig
from crosspool_jax.experiments import plots
from crosspool_jax.experiments.runner import pipeline_step
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import init_params
from tests.conftest import ROOT
from tests.experiments.test_report import demo_results


def _event(step, kind, start, end, *, mb=0, members=None, device="cpu:0", discarded=False):
  return {"step": step, "micro_batch": mb, "model": "m", "layer": 0, "kind": kind,
          "device": device, "start": start, "end": end, "members": members or [mb],
          "models": ["m"], "discarded": discarded}


def test_representative_step_is_the_median_of_the_steps_that_did_not_miss():
  events = [
      # step 0: 10 s long (two stages); step 16: 2 s; step 32: 6 s; step 48: 4 s
      _event(0, "attention_side", 100.0, 104.0), _event(0, "experts", 104.0, 110.0),
      _event(16, "attention_side", 200.0, 202.0),
      _event(32, "attention_side", 300.0, 303.0, mb=1),
      _event(32, "experts", 303.5, 306.0, mb=0, members=[0, 1], device="cpu:2"),
      _event(48, "attention_side", 400.0, 404.0),
      # step 64 missed: its speculative run (discarded) and the rerun; left out of the choice
      _event(64, "attention_side", 500.0, 501.0, discarded=True),
      _event(64, "attention_side", 501.0, 505.0),
      _event(80, "attention_side", 600.0, None),  # never stamped: ignored
  ]
  chosen = pipeline_step(events)
  # durations 10, 2, 6, 4 -> sorted 2, 4, 6, 10: the lower middle is step 48 (4 s)
  assert chosen["step"] == 48 and chosen["duration_s"] == 4.0
  assert chosen["recorded_steps"] == 5 and chosen["missed_steps_left_out"] == 1
  assert chosen["events"] == [{"kind": "attention_side", "device": "cpu:0", "start_s": 0.0,
                               "end_s": 4.0, "micro_batch": 0, "members": [0],
                               "models": ["m"], "layer": 0}]
  # Three steps: the middle one, times from its first issue, a fused call's members kept.
  chosen = pipeline_step([e for e in events if e["step"] in (0, 16, 32)])
  assert chosen["step"] == 32 and chosen["duration_s"] == 6.0
  assert [(e["kind"], e["start_s"], e["end_s"], e["members"]) for e in chosen["events"]] == [
      ("attention_side", 0.0, 3.0, [1]), ("experts", 3.5, 6.0, [0, 1])]
  # Only missed steps: chosen among them, from their kept (rerun) events.
  only_missed = pipeline_step([e for e in events if e["step"] == 64])
  assert only_missed["step"] == 64 and only_missed["duration_s"] == 4.0
  assert only_missed["missed_steps_left_out"] == 0
  assert pipeline_step([]) is None and pipeline_step(events[-1:]) is None


def _with_pipelines(results):
  crosspool = {"step": 32, "duration_s": 0.05, "recorded_steps": 3, "missed_steps_left_out": 1,
               "events": [{"kind": "swap_prefetch", "device": "cpu:2", "start_s": 0.0,
                           "end_s": 0.001, "micro_batch": -1, "members": [-1],
                           "models": ["a"], "layer": 1}]}  # an expert made resident first
  for layer in range(2):
    t = 0.025 * layer
    for mb in range(2):
      crosspool["events"] += [
          {"kind": "attention_side", "device": f"cpu:{mb}", "start_s": t + 0.002 * mb,
           "end_s": t + 0.006 + 0.002 * mb, "micro_batch": mb, "members": [mb],
           "models": ["a"], "layer": layer},
          {"kind": "transfer_to_weights", "device": "cpu:2", "start_s": t + 0.006 + 0.002 * mb,
           "end_s": t + 0.008 + 0.002 * mb, "micro_batch": mb, "members": [mb],
           "models": ["a"], "layer": layer}]
    crosspool["events"].append(
        {"kind": "experts", "device": "cpu:2", "start_s": t + 0.01, "end_s": t + 0.02,
         "micro_batch": 0, "members": [0, 1], "models": ["a", "b"], "layer": layer})
  shared = {"step": 16, "duration_s": 0.01, "recorded_steps": 3, "missed_steps_left_out": 0,
            "events": [{"kind": "model_step", "device": "cpu:0", "start_s": 0.0,
                        "end_s": 0.004, "micro_batch": 0, "members": [0], "models": ["a"],
                        "layer": -1},
                       {"kind": "model_step", "device": "cpu:1", "start_s": 0.004,
                        "end_s": 0.01, "micro_batch": 1, "members": [1], "models": ["b"],
                        "layer": -1}]}
  by = {r["name"]: r for r in results["runs"]}
  by["crosspool"]["wall_clock"]["pipeline_step"] = crosspool
  by["shared"]["wall_clock"]["pipeline_step"] = shared
  by["static"]["wall_clock"]["pipeline_step"] = None  # recorded nothing
  return results


def test_pipeline_png_is_drawn_from_the_results_alone(tmp_path):
  results = _with_pipelines(demo_results())
  assert [r["name"] for r in plots.pipeline_runs(results)] == ["crosspool", "shared"]
  paths = plots.write_plots(results, str(tmp_path))
  assert str(tmp_path / "pipeline.png") in paths
  assert os.path.getsize(tmp_path / "pipeline.png") > 5000
  # Without a shared run's timeline the static one is drawn; with none, no pipeline.png.
  del results["runs"][1]["wall_clock"]["pipeline_step"]
  results["runs"][0]["wall_clock"]["pipeline_step"] = copy.deepcopy(
      results["runs"][2]["wall_clock"]["pipeline_step"])
  assert [r["name"] for r in plots.pipeline_runs(results)] == ["crosspool", "static"]
  bare = demo_results()  # runs without any pipeline events (e.g. older results files)
  other = tmp_path / "bare"
  other.mkdir()
  paths = plots.write_plots(bare, str(other))
  assert not os.path.exists(other / "pipeline.png")
  assert {os.path.basename(p) for p in paths} == {"latency_cdf.png", "memory.png",
                                                  "activity.png"}


def test_colocated_executor_records_each_model_program_of_every_nth_step():
  models = {f: tiny_config(f) for f in ("mixtral", "qwen3_moe")}
  eng = Engine(EngineConfig(kv_policy="shared", page_elems=512, pages_per_device=64,
                            token_budget=16, token_buckets=(16,), max_batch=2,
                            attn_impl="reference", moe_impl="reference", timeline_every=2))
  for i, (f, cfg) in enumerate(models.items()):
    eng.register_model(f, cfg=cfg, params=init_params(cfg, seed=i), max_context=32,
                       max_batch=2)
  eng.start()
  for f in models:
    eng.submit(model_id=f, prompt_ids=[1, 2, 3], max_new_tokens=5)
  eng.generate_all()
  events = eng.executor.timeline.events
  steps = sorted({e["step"] for e in events})
  assert steps and all(s % 2 == 0 for s in steps)
  assert len(steps) == (eng.executor.steps + 1) // 2  # every other step
  for s in steps:  # one program per model batch, one after the other (tokens read in between)
    evs = [e for e in events if e["step"] == s]
    assert {e["kind"] for e in evs} == {"model_step"}
    assert [e["micro_batch"] for e in evs] == list(range(len(evs)))
    assert all(e["start"] <= e["end"] for e in evs)
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(evs))
  assert {m for e in events for m in e["models"]} == set(models)
  assert eng.metrics()["pipeline_overlap"]["overlap_fraction"] == 0.0
  chosen = pipeline_step(events)
  assert chosen["events"][0]["start_s"] == 0.0 and chosen["events"][0]["device"] == "cpu:0"


def test_profile_dir_writes_a_profiler_trace(tmp_path):
  prof = tmp_path / "prof"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "serve.py"),
                         f"--config={os.path.join(ROOT, 'configs', 'serve', 'demo.py')}:runlocal",
                         f"--workdir={tmp_path / 'w'}", f"--profile_dir={prof}",
                         "--profile_steps=2"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = glob.glob(str(prof / "plugins" / "profile" / "*"))
  assert len(runs) == 1
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))  # TensorBoard / XProf
  assert glob.glob(os.path.join(runs[0], "perfetto_trace.json.gz"))  # ui.perfetto.dev
  assert f"profiler trace of 2 steps (after 2 warm-up steps) in {prof}" in proc.stderr
