"""The smoke fleet as a user builds it: its checkpoints load, generate and reproduce; its
routing statistics, the pool benchmark and an experiment run on it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crosspool_jax.experiments.runner import check_experiment, expand_fleet
from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.tokenizer import load_tokenizer
from crosspool_jax.train.fleet import build_fleet, read_fleet
from crosspool_jax.train.routing_stats import fleet_stats, plot_stats
from scripts.routing_stats import format_table
from tests.conftest import FAMILIES, ROOT, get_config


def _run(script, *args, ok=True):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
  out = tmp_path_factory.mktemp("fleet")
  proc = _run("make_fleet.py", "--config=configs/train/fleet.py:smoke", f"--out={out}")
  assert json.loads(proc.stdout.strip().splitlines()[-1])["fleet"] == str(out / "fleet.json")
  return str(out)


def test_smoke_fleet_has_a_base_and_fine_tunes_per_family(fleet):
  manifest = read_fleet(fleet)
  ids = [m["id"] for m in manifest["models"]]
  assert ids == [f"{f}_{kind}" for f in FAMILIES for kind in ("base", "code", "docstrings")]
  for model in manifest["models"]:
    cfg, params = load_checkpoint(model["dir"])
    assert cfg == tiny_config(model["family"])
    assert load_tokenizer(model["dir"]).get_vocab_size() == cfg.vocab_size
    assert set(model["heldout"]) == {"code", "docstrings", "comments"}
    if model["base"] is not None:
      _, base = load_checkpoint(os.path.join(fleet, model["base"]))
      assert not np.array_equal(params["layers"][0]["ffn"]["w_up_EDF"],
                                base["layers"][0]["ffn"]["w_up_EDF"])


def test_fleet_member_generates_from_text(fleet):
  # What scripts/generate.py --checkpoint=DIR --prompt=... does: load_checkpoint, the
  # directory's tokenizer.json, generate.
  cfg, params = load_checkpoint(os.path.join(fleet, "olmoe_code"))
  tokenizer = load_tokenizer(os.path.join(fleet, "olmoe_code"))
  (tokens,) = generate(params, cfg, [tokenizer.encode("def f(").ids], max_new_tokens=5)
  assert len(tokens) == 5 and isinstance(tokenizer.decode(tokens), str)


def test_fleet_is_reproducible_and_builds_a_family_at_a_time(fleet, tmp_path):
  config = get_config("smoke")
  config.families = ("qwen3_moe",)
  build_fleet(config, str(tmp_path), log=lambda _: None)
  for model_id in ("qwen3_moe_base", "qwen3_moe_docstrings"):
    ours = (tmp_path / model_id / "model.safetensors").read_bytes()
    assert ours == open(os.path.join(fleet, model_id, "model.safetensors"), "rb").read()
  # Another family into the same directory keeps qwen3_moe's models; another seed is refused.
  config.families = ("olmoe",)
  manifest = build_fleet(config, str(tmp_path), log=lambda _: None)
  assert [m["id"] for m in manifest["models"]] == [
      "qwen3_moe_base", "qwen3_moe_code", "qwen3_moe_docstrings", "olmoe_base", "olmoe_code",
      "olmoe_docstrings"]
  assert set(manifest["build_s"]) == {"qwen3_moe", "olmoe", "corpus"}
  config.seed = 1
  with pytest.raises(ValueError, match="holds a fleet built from another config"):
    build_fleet(config, str(tmp_path), log=lambda _: None)


def test_routing_stats_of_the_fleet(fleet, tmp_path):
  stats = fleet_stats(fleet, windows=2, log=lambda _: None)
  assert len(stats["models"]) == 12 and set(stats["random_init"]) == set(FAMILIES)
  for s in stats["models"].values():
    assert 0 < s["entropy"] <= 1 and len(s["layers"]) == 2
  assert set(stats["hot_overlap"]["mixtral"]["pairs"]) == {
      "mixtral_base|mixtral_code", "mixtral_base|mixtral_docstrings",
      "mixtral_code|mixtral_docstrings"}
  assert os.path.exists(plot_stats(stats, str(tmp_path / "routing.png")))
  assert "random init olmoe" in format_table(stats)


def test_bench_pools_runs_random_and_trained_fleets_side_by_side(fleet, tmp_path):
  out = tmp_path / "pools.json"
  proc = _run("bench_pools.py", f"--fleet={fleet}", "--families=qwen3_moe",
              "--models_per_family=2", "--requests=3", "--prompt_len=6", "--new_tokens=2",
              "--fractions=0.5", "--policies=lru,activation_aware", "--live_policies=",
              "--sections=weights", f"--out={out}")
  result = json.loads(out.read_text())
  random, trained = result["weights_pool"], result["weights_pool_trained"]
  assert list(random["fleet"]) == ["qwen3_moe-0", "qwen3_moe-1"]
  assert list(trained["fleet"]) == ["qwen3_moe_base", "qwen3_moe_code"]
  # The same requests: model k of one fleet where model k of the other.
  assert [w["model"][-1] for w in random["workload"]] == [
      "0" if w["model"].endswith("base") else "1" for w in trained["workload"]]
  for r in (*random["replay"], *trained["replay"]):
    assert r["loads"] >= r["belady_loads"]
    if r["policy"] == "lru":  # demand fetching: MIN bounds its hits
      assert r["hit_rate"] <= r["belady_hit_rate"] + 1e-12
    else:
      assert r["prefetch_hits"] <= r["prefetch_loads"]
  for fleet_result in (random, trained):
    p = fleet_result["prediction"]
    # every event but a model's last MoE layer in a step predicts; qwen3_moe's tiny config
    # has 2 MoE layers
    assert p["predictions"] == fleet_result["trace_events"] // 2
    assert 0 <= p["correct"] <= min(p["predicted"], p["used"])
  assert "side by side (replay):" in proc.stdout and "trained: hit" in proc.stdout
  assert "next-layer prediction (trained): precision" in proc.stdout

  # make_benchmarks renders it as the policy section, with the command that made it.
  md = tmp_path / "B.md"
  _run("make_benchmarks.py", f"--pools={out}", f"--out={md}")
  text = md.read_text()
  assert "## Weights-pool policies: random vs trained routing" in text
  assert f"--fleet={fleet}" in text and "--policies=lru,activation_aware" in text
  assert "| 50% | activation_aware |" in text and "Best demand-fetching policy" in text
  random_only = tmp_path / "random_only.json"
  random_only.write_text(json.dumps({"header": result["header"], "weights_pool": random}))
  assert "not a scripts/bench_pools.py --fleet" in _run(
      "make_benchmarks.py", f"--pools={random_only}", ok=False).stderr


def test_experiment_serves_the_trained_fleet(fleet):
  config = get_config("smoke", ("experiments", "demo.py"))
  config.fleet_dir = fleet
  config.fleet_size = 4
  check_experiment(config)  # every run's plan holds the trained models
  served = config.copy_and_resolve_references()
  served.unlock()
  expand_fleet(served)
  # Copies of an entry are further fine-tunes of its base.
  assert {m: os.path.basename(e.checkpoint) for m, e in served.fleet.items()} == {
      "mixtral_0": "mixtral_base", "mixtral_0_c1": "mixtral_code",
      "qwen2_moe_1": "qwen2_moe_base", "qwen2_moe_1_c1": "qwen2_moe_code"}
  config.fleet_size = 8
  with pytest.raises(ValueError, match=r"config.fleet_dir .* holds 3 \w+ model\(s\); "
                                       r"config.fleet.\w+_c3 would be number 4"):
    check_experiment(config)


def test_bad_fleet_config_names_the_field(tmp_path):
  config = get_config("smoke")
  config.families = ("mixtral", "gpt2")
  with pytest.raises(ValueError, match="fleet families must be a non-empty subset of"):
    build_fleet(config, str(tmp_path))
  config = get_config("smoke")
  config.finetune_domains = ("code", "code")
  with pytest.raises(ValueError, match="fleet finetune_domains must be distinct domains"):
    build_fleet(config, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="is not a fleet directory"):
    read_fleet(str(tmp_path))
