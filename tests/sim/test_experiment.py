"""Experiment configs in simulated time (config.mode="sim"): the results file has the measured
schema that the report and plots read, its counts are those of `simulate` called directly on
the same config, reference shapes serve only in simulation, and a budget too small for the
fleet is a refused run."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from crosspool_jax.capacity import REFERENCE_HF_CONFIGS, reference_config
from crosspool_jax.engine.policies.sizes import param_bytes
from crosspool_jax.experiments.config_lib import reference_fleet
from crosspool_jax.experiments.plots import write_plots
from crosspool_jax.experiments.report import benchmarks_section, comparison_table, latency_row
from crosspool_jax.experiments.runner import (
  SAMPLE_KEYS,
  check_experiment,
  expand_fleet,
  run_config,
  run_names,
)
from crosspool_jax.experiments.serving import build_engine, engine_config, load_trace
from crosspool_jax.models.config import tiny_config
from crosspool_jax.sim import SLO, Efficiency, Routing, SimModel, simulate
from crosspool_jax.sim.experiment import sim_config, sim_fleet, simulate_experiment
from tests.conftest import ROOT

CONFIGS = os.path.join(ROOT, "configs", "experiments")


def experiment_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _sim_demo():
  config = experiment_config("demo.py", "smoke")
  config.mode = "sim"
  return config


@pytest.fixture(scope="module")
def demo_results():
  return simulate_experiment(_sim_demo(), log=lambda msg: None, command="test")


def test_sim_results_feed_the_table_plots_and_benchmarks(demo_results, tmp_path):
  r = demo_results
  assert r["mode"] == "sim" and r["device"]["platform"] == "sim"
  assert [run["name"] for run in r["runs"]] == ["static", "shared", "crosspool"]
  for run in r["runs"]:  # times under `simulated`, only the simulation's own under wall_clock
    assert set(run["wall_clock"]) == {"simulation_s"}
    assert run["simulated"]["tbt_s"]["p99"] is not None
  table = comparison_table(r)
  assert table.startswith("demo (smoke), SIMULATED on 4 x h100_sxm: times are MODELLED")
  assert "It lost on latency (wall clock)" not in table and "wall clock" not in table
  paths = write_plots(r, str(tmp_path))
  assert {os.path.basename(p) for p in paths} == {"latency_cdf.png", "memory.png",
                                                  "activity.png"}
  section = benchmarks_section(r, source="x.json")
  assert section.startswith("## demo (smoke), SIMULATED on 4 x h100_sxm")
  assert "Outputs not compared: a simulated run computes no tokens." in section


def test_sim_mode_counts_are_simulates_on_the_same_config(demo_results):
  """The experiment's loop against `simulate` called here on each run's engine config, fleet
  and trace, built by hand from the config."""
  config = sim_config(_sim_demo())
  base = config.copy_and_resolve_references()
  base.unlock()
  expand_fleet(base)
  records, _ = load_trace(base)
  for name, run in zip(run_names(config), demo_results["runs"], strict=True):
    c, _ = run_config(base, name)
    fleet = {m: SimModel(tiny_config(e.family, **e.overrides.to_dict()), e.max_batch,
                         e.max_context, e.group) for m, e in c.fleet.items()}
    direct = simulate(engine_config(c.engine), fleet, records, device="h100_sxm",
                      slo=SLO(ttft_s=c.slo.ttft_s, tbt_s=c.slo.tbt_s), weight_dtype="float32",
                      efficiency=Efficiency(), routing=Routing(),
                      arrival_mode=c.arrival_mode, logical_step_s=c.logical_step_s)
    assert run["counts"] == direct["counts"], name
    assert run["simulated"] == direct["simulated"], name


def test_a_reference_fleet_serves_only_in_simulation():
  config = experiment_config("demo.py", "smoke")
  config.budget.device_bytes = 0  # engine pages as given: no plan of a 7B model on 2.5 MiB
  config.fleet.mixtral_0.reference = "olmoe-1b-7b"
  with pytest.raises(ValueError, match=r"config.fleet.mixtral_0.reference='olmoe-1b-7b' is a "
                                       r"public shape with no weights: simulate it "
                                       r"\(--config.mode=sim\)"):
    check_experiment(config)
  c, _ = run_config(config, "shared")
  with pytest.raises(ValueError, match="no weights"):
    build_engine(c, log=lambda msg: None)
  config.mode = "sim"
  check_experiment(sim_config(config))  # the same config simulates
  config.fleet.mixtral_0.reference = "deepseek-v9"
  with pytest.raises(ValueError, match=r"config.fleet.mixtral_0.reference must be one of"):
    check_experiment(sim_config(config))


@pytest.mark.parametrize("name", sorted(REFERENCE_HF_CONFIGS))
def test_every_reference_shape_makes_a_fleet(name):
  """Two copies of each public shape (Qwen1.5's name has dots, which a config field name
  cannot): valid in simulation, each copy the shape of `reference_config`."""
  config = _sim_demo()
  config.fleet = reference_fleet({name: 2}, max_batch=4, max_context=256)
  ids = [f"{name.replace('.', '_')}_{i}" for i in range(2)]
  assert list(config.fleet) == ids
  config.workload.popularity = ",".join(ids)
  c = sim_config(config)
  check_experiment(c)
  expand_fleet(c)
  fleet = sim_fleet(c)
  assert list(fleet) == ids
  assert all(model.cfg == reference_config(name) for model in fleet.values())


def test_the_mixed_paper_scale_fleet_has_both_bases():
  c = sim_config(experiment_config("paper_scale.py", "mixed"))
  check_experiment(c)
  expand_fleet(c)
  shapes = [model.cfg for model in sim_fleet(c).values()]
  assert shapes.count(reference_config("olmoe-1b-7b")) == 8
  assert shapes.count(reference_config("qwen1.5-moe-a2.7b")) == 4 and len(shapes) == 12


@pytest.mark.parametrize("field, value, error", [
    ("mode", "simulate", "config.mode must be one of ('run', 'sim')"),
    ("sim.device", "h1000", "config.sim.device must be one of"),
    ("sim.efficiency.experts", 1.5, "config.sim.efficiency: efficiency.experts must be in"),
    ("sim.routing.kind", "zipfian", "config.sim.routing: routing.kind must be one of"),
    ("fleet_size", -1, "config.fleet_size must be an integer >= 0"),
])
def test_bad_sim_fields_are_named(field, value, error):
  config = _sim_demo()
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
    check_experiment(sim_config(config))


def test_a_fleet_the_budget_cannot_hold_is_a_refused_run():
  """9 Qwen3-30B-A3B on 8 devices of 80 GiB: static keeps a model's whole weights on one device,
  and two do not fit in one device's 90 % (hand arithmetic from the public config below)."""
  cfg = reference_config("qwen3-30b-a3b")
  experts = cfg.num_layers * cfg.num_experts * 3 * 2048 * 768 * 2  # bf16
  projections = cfg.num_layers * 2048 * (32 + 32 + 4 + 4) * 128 * 2  # q, o, k, v
  embeddings = 2 * 151936 * 2048 * 2  # embed and the untied head
  weights = experts + projections + embeddings  # norms and routers left out: a lower bound
  usable = 0.9 * 80 * 2**30
  assert usable > sum(param_bytes(cfg, "bfloat16")[k] for k in ("non_expert", "routed_experts"))
  assert 2 * weights > usable  # one model fits a device, two do not
  config = experiment_config("paper_scale.py", "smoke")
  config.policies = {"static": config.policies.static}
  config.sweep.points, config.fleet_size = (1.0,), 9
  config.workload.num_requests = 2
  r = simulate_experiment(config, log=lambda msg: None)
  (run,) = r["runs"]
  assert run["refused"].startswith("budget: static: model ") and "does not fit" in run["refused"]
  assert latency_row(run)["done/rej"] == "refused"
  assert "static was refused (budget: static:" in comparison_table(r)


def test_the_script_writes_sim_results_and_a_summary_without_samples(tmp_path):
  summary = tmp_path / "summary.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "run_experiment.py"),
       f"--config={os.path.join(CONFIGS, 'demo.py')}:smoke", "--config.mode=sim",
       f"--workdir={tmp_path}", f"--summary_out={summary}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SIMULATED on 4 x h100_sxm" in proc.stdout
  full = json.loads((tmp_path / "results.json").read_text())
  small = json.loads(summary.read_text())
  assert full["mode"] == small["mode"] == "sim"
  assert comparison_table(small) == comparison_table(full)

  def keys(x):
    if isinstance(x, dict):
      return set(x) | set().union(*map(keys, x.values()))
    return set().union(*map(keys, x)) if isinstance(x, list) else set()

  assert not keys(small) & set(SAMPLE_KEYS) and set(SAMPLE_KEYS) - {"arrivals"} <= keys(full)
