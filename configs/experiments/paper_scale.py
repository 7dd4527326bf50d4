r"""The paper's setting, simulated: P99 TBT against request rate, 16 cold Qwen3-30B-A3B on 8 H100.

  python scripts/run_experiment.py --config=configs/experiments/paper_scale.py:sim
  python scripts/run_experiment.py --config=configs/experiments/paper_scale.py:olmoe \
      --workdir=workdir/paper_scale_olmoe_sim --summary_out=benchmarks/sim/paper_scale_olmoe.json

16 fine-tunes of Qwen3-30B-A3B (the public config's shape: 48 layers, 128 experts top-8 of
d_ff 768, 4 KV heads of 128; ~61 GB of bf16 weights each, ~95 % of it routed experts) on
8 x H100 SXM 80 GB, every policy planned from the same per-device budget: static and shared
keep each model's whole weights on one device (so a device holds one model and 16 do not fit:
those runs are refused, a result of the plan, not an error); crosspool and
crosspool_partitioned keep attention, embeddings and routers on 5 KV devices next to one
pooled KV cache, and the routed experts in a weights pool on 3 devices (about a quarter of
the fleet's experts resident, LRU, swapped in over PCIe). Bursty Zipf traffic (CV 4, random
correlated bursts) with a long-context tail; one trace per rate (`sweep.png`).
The crosspool runs of `:sim` swap experts and do not finish in CPU minutes (WORKSPACE.md,
"Simulated experiments"); `:olmoe` is the same experiment with OLMoE-1B-7B, a fleet every
policy holds (its results are committed); `:mixed` with a mixed fleet of two bases' fine-tunes,
8 OLMoE-1B-7B and 4 Qwen1.5-MoE-A2.7B (two shape classes in the weights pool):

  python scripts/run_experiment.py --config=configs/experiments/paper_scale.py:mixed \
      --workdir=workdir/paper_scale_mixed_sim --summary_out=benchmarks/sim/paper_scale_mixed.json

Simulated only (`mode="sim"`): no weights needed.
"""

from __future__ import annotations

from crosspool_jax.experiments import config_lib as cl


def get_config(arg: str | None = None):
  """arg "sim" (the default): the experiment; "olmoe": the same with OLMoE-1B-7B, a fleet
  every policy holds; "mixed": 8 OLMoE-1B-7B and 4 Qwen1.5-MoE-A2.7B; "smoke": 2
  Qwen3-30B-A3B, 12 short requests, 2 rates (tests)."""
  c = cl.experiment_base("paper_scale", arg, "P99 TBT against request rate, 16 cold "
                         "Qwen3-30B-A3B-shaped models on 8 x H100 SXM, bursty long-context "
                         "traffic (simulated)", variants=("sim", "olmoe", "mixed", "smoke"))
  fleets = {"olmoe": {"olmoe-1b-7b": 16},
            "mixed": {"olmoe-1b-7b": 8, "qwen1.5-moe-a2.7b": 4}}
  cl.paper_scale_setup(c, references=fleets.get(c.variant, {"qwen3-30b-a3b": 16}))
  if c.variant == "olmoe":
    c.description = c.description.replace("Qwen3-30B-A3B", "OLMoE-1B-7B")
  if c.variant == "mixed":
    c.description = c.description.replace(
        "16 cold Qwen3-30B-A3B-shaped models", "a mixed fleet of 8 OLMoE-1B-7B- and 4 "
        "Qwen1.5-MoE-A2.7B-shaped cold models")
  c.sweep.field = "workload.total_rate"
  c.sweep.points = (1.0, 2.0, 4.0, 8.0)
  cl.paper_scale_workload(c, total_rate=2.0, burst_group_size=4)
  if c.variant == "smoke":
    c.fleet_size = 2
    c.sweep.points = (1.0, 4.0)
    c.workload.num_requests, c.workload.burst_group_size = 12, 2
    c.workload.output_len.low, c.workload.output_len.high = 4, 16
  return c
