r"""Ablations of CrossPool: what each of its parts is worth, on the demo's fleet and trace.

  python scripts/run_experiment.py --config=configs/experiments/ablations.py:cpu
  python scripts/run_experiment.py --config=configs/experiments/ablations.py:full \
      --config.fleet.m0.checkpoint=DIR0 ... --config.fleet.m7.checkpoint=DIR7
  python scripts/run_experiment.py --config=configs/experiments/ablations.py:sim \
      --workdir=workdir/ablations_sim --summary_out=benchmarks/sim/ablations.json

Runs (same trace, same per-device budget unless said):
  crosspool              the full policy (2 micro-batches, LRU expert swapping)
  no_pipeline            one micro-batch: the two pools wait on each other every layer
  no_fusion              one expert-dispatch call per micro-batch (no sharing of a call by
                         the micro-batches, or models, of one shape class)
  no_swapping            pin_all: every expert resident; its weights devices get the bytes
                         all experts need (3.5 MiB instead of 2.5 on cpu; the KV devices keep
                         the common budget): the memory that swapping saves
  no_consolidation       `crosspool_partitioned`: the weights pool partitioned per model (each
                         model's own expert slots, never another's, no expert call shared by
                         two models); a partition holds at least one layer's experts per
                         weights device, 16 slots per model here, so its weights devices get
                         3 MiB on cpu (2.5 MiB holds 13 per model): the memory consolidation
                         saves
  no_weights_pool        `shared`: no weights pool at all, each model's whole weights on its
                         device (KV still pooled per device)
  planner_on             (sim only) `budget.kv_planner` for this run: the KV planner splits
                         the 8 devices (most KV pages, expert slots filling the weights
                         devices) instead of the given 5 KV + 3 weights; planner off is the
                         crosspool run itself, so it has no row of its own

`sim`: paper_scale.py:olmoe's fleet and trace at 4 requests/s (16 OLMoE-1B-7B shapes on 8
simulated H100 SXM of 80 GiB, 100 bursty requests; crosspool and no_consolidation are that
experiment's crosspool and crosspool_partitioned rows at 4 req/s). Every run maps to what the
simulator models (`sim/executor.py`): micro_batches to the ping-pong phases and pipelined
device queues, fuse_experts to the expert calls planned, the expert policy and the
partitioned pool to the real weights pool's hits and loads, the planner to the plan. 80 GiB
already hold every expert of the fleet on 3 weights devices, consolidated or not, so
no_swapping and no_consolidation get no extra memory: what no_swapping removes is the cold
start (pin_all loads every expert before the trace, as colocated weights are; those 16,384
loads are in its row's loads but charged no time). Measured in simulated time (2-2.5 min of CPU),
TTFT / TBT p50/p99 in ms:
  crosspool              463 / 1,782     7 / 16
  no_pipeline            1,118 / 2,425   10 / 18   (TTFT p99 past the 2 s SLO)
  no_fusion              456 / 1,783     6 / 17    (one call per micro-batch: 77,440 calls
                         against 44,864; a fused call's members are different models, so it
                         shares no weight bytes and saves only launches of ~5 us, while its
                         members wait for each other's attention: no gain in the model)
  no_swapping            34 / 266        4 / 10    (the cold start is crosspool's TTFT)
  no_consolidation       968 / 2,398     9 / 25    (confounded: with 16 MoE layers on 3 weights
                         devices the consolidated pool staggers each model's layer homes by
                         one device, (model + layer) mod 3, while each partition starts at
                         device 0, so every model's layer l lands on device l mod 3 and their
                         calls queue there)
  no_weights_pool        27 / 170        3 / 9
  planner_on             84,649 / 273,380   1,248 / 2,511 (7 KV + 1 weights device: 37.5 % of
                         the experts resident, hit rate 0.30, 1.4 M loads: LRU thrashes; the
                         planner's objective, KV pages, is the wrong one for this fleet, whose
                         KV peaks at 3 % of the pool)
What it shows: the pipeline and a warm pool (no cold start) are worth the most, fusion
nothing in the model; with every part on, crosspool stays behind shared's latency.
"""

from __future__ import annotations

import ml_collections

from crosspool_jax.experiments import config_lib as cl


def _demo():
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


VARIANTS = ("cpu", "full", "sim")
DESCRIPTION = ("CrossPool without its pipeline, without fused expert calls, without expert "
               "swapping, without consolidation of the weights pool, without a weights pool")


def get_config(arg: str | None = None):
  """arg "cpu" (the default): the demo's fleet and trace; "full": 8 checkpoints on
  accelerators; "sim": 16 OLMoE-1B-7B shapes on 8 simulated H100, with planner_on."""
  variant = arg or VARIANTS[0]
  if variant not in VARIANTS:
    raise ValueError(f"ablations: the variant must be one of {VARIANTS}, got {arg!r}")
  if variant == "sim":
    c = cl.experiment_base("ablations", variant, DESCRIPTION + " (simulated, 16 cold "
                           "OLMoE-1B-7B-shaped models on 8 x H100 SXM)", variants=VARIANTS)
    cl.paper_scale_setup(c, references={"olmoe-1b-7b": 16})
    cl.paper_scale_workload(c, total_rate=4.0, burst_group_size=4)
  else:
    c = _demo().get_config("cpu")
    c.name, c.variant, c.description = "ablations", variant, DESCRIPTION
  if variant == "full":
    cl.full_scale(c)
  crosspool = c.policies.crosspool.to_dict()
  # cpu: 3.5 MiB weights devices hold all 128 experts, 3 MiB the smallest per-model
  # partitions; full: 8 Qwen1.5-MoE fit on 3 x 80 GiB already, consolidated or not (see
  # scripts/capacity.py), and sim: 16 OLMoE-1B-7B too, so neither costs extra memory there.
  cpu = variant == "cpu"
  no_swap = dict(weights_device_bytes=7 * 2**19) if cpu else {}
  partitioned = dict(weights_device_bytes=6 * 2**19) if cpu else {}
  runs = dict(
      crosspool=crosspool,
      no_pipeline=crosspool | dict(micro_batches=1),
      no_fusion=crosspool | dict(fuse_experts=False),
      no_swapping=crosspool | dict(expert_policy="pin_all", **no_swap),
      no_consolidation=crosspool | dict(kv_policy="crosspool_partitioned", **partitioned),
      no_weights_pool=c.policies.shared.to_dict(),
  )
  if variant == "sim":
    runs["planner_on"] = crosspool | dict(kv_planner=True)
  c.policies = ml_collections.ConfigDict(runs)
  return c
