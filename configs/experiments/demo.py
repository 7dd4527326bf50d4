r"""The CPU demo: one bursty cold-fleet trace under static, shared and crosspool (README).

  python scripts/run_experiment.py                      # this config, default settings
  python scripts/run_experiment.py --config=configs/experiments/demo.py \
      --config.workload.num_requests=40 --workdir=/tmp/demo

Four tiny MoE models (four families, three KV shapes, experts ~80% of the parameters like real
MoE checkpoints) on 4 CPU devices of 2.5 MiB each (accounting: CPU devices have no limit).
static and shared keep one model's whole weights per device and fill the rest with KV pages;
crosspool puts attention and the KV pool on devices 0-1 and every model's experts in the
weights pool on 2-3 (about 5/6 of them fit: LRU swaps the rest). Zipf-skewed popularity,
Gamma arrivals (CV 2), the two coldest models bursting together, and a long-context tail of
prompts that only a pooled KV cache can hold. Arrivals follow a logical clock (a schedule
independent of the machine's speed), so everything but the wall-clock fields repeats exactly.
Every policy schedules short prompts first (`engine.short_prefills_first`): a short request
arriving behind one of the tail's long prompts of its model does not wait for that prompt's last
chunk (under first come, first served, crosspool's TTFT p90 was ~1.5 s on this trace and 0.7 of its
requests met the SLO; with it 0.7-1.0 s and 0.88-0.95, measured in WORKSPACE.md).

The `cpu_equal` variant is the same trace without its long-context tail (every prompt from
the body of the length distribution), so every policy serves every request: the latencies
compare the same work, where in `cpu` crosspool also prefills the long prompts that static and
shared reject (most of its tokens then come from steps carrying their prompt chunks: the
summary's "Where the tokens came from"):

  python scripts/run_experiment.py --config=configs/experiments/demo.py:cpu_equal

The `2proc` variants (`cpu_2proc`, `smoke_2proc`) serve only the crosspool run, on one KV
device and one weights device of 5 MiB each (the bytes of the 4-device run's crosspool), so
the same config runs in one process (2 CPU devices) and across two (one each; KV pool in
process 0, weights pool in process 1), the process boundary the only difference:

  python scripts/run_experiment.py --config=configs/experiments/demo.py:cpu_2proc \
      --workdir=workdir/demo_cpu_1proc
  python scripts/launch_local.py --num_processes=2 --target=scripts/run_experiment.py \
      --target_args="--config=configs/experiments/demo.py:cpu_2proc \
      --workdir=workdir/demo_cpu_2proc"
"""

from __future__ import annotations

import ml_collections

from crosspool_jax.experiments import config_lib as cl


def get_config(arg: str | None = None):
  """The demo; arg "smoke" is a seconds-long version (two models, eight requests) for tests;
  "cpu_equal" its trace without the long-context tail; "cpu_2proc" and "smoke_2proc" their
  crosspool runs on 1 KV + 1 weights device."""
  c = cl.experiment_base("demo", arg, "static vs shared vs crosspool, 4 tiny MoE models on 4 "
                      "CPU devices, bursty Zipf traffic with a long-context tail",
                      variants=("cpu", "smoke", "cpu_equal", "cpu_2proc",
                                "smoke_2proc"))
  cl.cpu_setup(c)  # 2.5 MiB per device
  c.workload = cl.workload_block(
      popularity="mixtral_0,qwen2_moe_1,olmoe_2,qwen3_moe_3", num_requests=60,
      total_rate=6.0, cv=2.0,
      bursts=((("olmoe_2", "qwen3_moe_3"), 4.0, 2.0, 4.0),),
      prompt_len=cl.length_dist(median=32.0, sigma=0.6, low=4, tail_fraction=0.1, tail_low=600,
                             tail_high=1800),
      output_len=cl.length_dist("uniform", low=8, high=24))
  cl.loop_fields(c, arrival_mode="logical", logical_step_s=0.05)
  c.engine.short_prefills_first = True
  if c.variant == "cpu_equal":
    c.description = ("the demo's trace without its long-context tail: every policy serves "
                     "every request")
    c.workload.prompt_len.tail_fraction = 0.0
  if c.variant.startswith("smoke"):
    c.fleet = cl.cpu_fleet(2, max_context=1024)
    c.engine.token_buckets, c.engine.token_budget = (32,), 32
    c.workload.popularity = "mixtral_0,qwen2_moe_1"
    c.workload.num_requests, c.workload.bursts = 8, ()
    c.workload.prompt_len.tail_fraction, c.workload.prompt_len.tail_low = 0.25, 300
    c.workload.prompt_len.tail_high = 900
    c.workload.output_len.low, c.workload.output_len.high = 2, 6
  if c.variant.endswith("_2proc"):
    c.description = ("the demo's crosspool run on 1 KV + 1 weights CPU device, in one process "
                     "or across two")
    c.num_cpu_devices = 2
    c.budget.device_bytes *= 2  # the 4-device run's crosspool bytes on 2 devices
    c.policies = ml_collections.ConfigDict(dict(
        crosspool=dict(kv_policy="crosspool", devices=(0,), weight_devices=(1,))))
  return c
