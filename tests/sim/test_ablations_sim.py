"""ablations.py:sim: each run differs from crosspool in its knob, the planner's split is checked
by hand, and a small copy serves every run."""

from crosspool_jax.capacity import reference_config
from crosspool_jax.experiments.runner import check_experiment, expand_fleet, run_config
from crosspool_jax.sim.experiment import sim_config, simulate_experiment
from tests.sim.test_experiment import experiment_config

OLMOE = reference_config("olmoe-1b-7b")
EXPERT_BYTES = 3 * OLMOE.d_model * OLMOE.d_ff_expert * 2  # bf16 gate, up, down


def test_ablations_sim_runs_differ_from_crosspool_in_their_knob_only():
  config = experiment_config("ablations.py", "sim")
  crosspool = config.policies.crosspool.to_dict()
  knobs = {"no_pipeline": {"micro_batches": 1}, "no_fusion": {"fuse_experts": False},
           "no_swapping": {"expert_policy": "pin_all"},
           "no_consolidation": {"kv_policy": "crosspool_partitioned"},
           "planner_on": {"kv_planner": True}}
  for name, knob in knobs.items():
    assert config.policies[name].to_dict() == crosspool | knob, name
  assert config.policies.no_weights_pool.kv_policy == "shared"
  check_experiment(sim_config(config))


def test_ablations_sim_planner_on_splits_the_devices_for_the_most_kv():
  """By hand: a weights device of 80 GiB (90 % usable) holds 6,144 OLMoE experts, more than
  one layer's 64, so one weights device is feasible, and the fewer weights devices, the more
  KV devices and pages: the planner takes 7 KV + 1 weights where crosspool is given 5 + 3."""
  config = experiment_config("ablations.py", "sim")
  config.unlock()
  expand_fleet(config)
  slots = int(0.9 * 80 * 2**30) // EXPERT_BYTES
  assert slots == 6144 >= OLMOE.num_experts
  given, _ = run_config(config, "crosspool")
  planned, plan = run_config(config, "planner_on")
  assert (len(given.engine.devices), len(given.engine.weight_devices)) == (5, 3)
  assert (len(planned.engine.devices), len(planned.engine.weight_devices)) == (7, 1)
  assert plan.expert_slots_per_device == slots


def test_ablations_sim_small_serves_every_run():
  """2 models, 6 short requests: every run is simulated; pin_all's experts are all resident
  before the trace (no access misses); crosspool's cold pool loads them as the models first
  run, prefetched before the step (the 2 models' experts fit the pool, so all are predicted):
  no access misses either."""
  config = experiment_config("ablations.py", "sim")
  config.fleet_size = 2
  config.workload.num_requests, config.workload.burst_group_size = 6, 2
  config.workload.output_len.low, config.workload.output_len.high = 4, 8
  results = simulate_experiment(config, log=lambda msg: None)
  runs = {r["name"]: r for r in results["runs"]}
  assert set(runs) == set(config.policies) and not any(r.get("refused") for r in runs.values())
  for run in runs.values():
    assert run["counts"]["finished"] == 6, run["name"]
  assert runs["no_swapping"]["counts"]["expert_hit_rate"] == 1.0
  cold = runs["crosspool"]["counts"]
  assert cold["expert_loads"] > 0 and cold["expert_hit_rate"] == 1.0
  assert cold["expert_calls"]["miss_steps"] == 0
