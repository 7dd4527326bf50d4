r"""P99 time-between-tokens against request rate, under bursty long-context load.

  python scripts/run_experiment.py --config=configs/experiments/tbt_vs_rate.py:cpu
  python scripts/run_experiment.py --config=configs/experiments/tbt_vs_rate.py:full \
      --config.fleet.m0.checkpoint=DIR0 ... --config.fleet.m7.checkpoint=DIR7

The paper's latency claim: at equal memory, the pooled organisation keeps the TBT tail lower
as load rises, because long-context bursts are admitted instead of queued or preempted. One
trace per rate (same seed, so the same shape scaled), every policy on each; sweep.png plots
p99 TBT and TTFT against the rate. Arrivals follow the wall clock here (a faster policy sees
less queueing), so latencies and the counts that depend on them vary run to run; quote
medians of several runs. On CPU the per-step cost of the disaggregated executor (several
dispatches per layer, no accelerator to overlap with) dominates; the shape of the curves, not
their level, is what transfers.
"""

from __future__ import annotations

from crosspool_jax.experiments import config_lib as cl


def get_config(arg: str | None = None):
  c = cl.experiment_base("tbt_vs_rate", arg, "p99 TBT against request rate, bursty (CV 4) "
                      "traffic with a long-context tail")
  cl.cpu_setup(c)
  c.sweep.field = "workload.total_rate"
  c.sweep.points = (2.0, 4.0, 8.0)
  c.workload = cl.workload_block(
      popularity=",".join(c.fleet.keys()), num_requests=40, total_rate=4.0, cv=4.0,
      random_bursts=1, burst_group_size=2, burst_duration_s=2.0, burst_factor=4.0,
      prompt_len=cl.length_dist(median=32.0, sigma=0.6, low=4, tail_fraction=0.15, tail_low=400,
                             tail_high=1000),
      output_len=cl.length_dist("uniform", low=8, high=24))
  cl.loop_fields(c, arrival_mode="trace")
  if c.variant == "full":
    cl.full_scale(c)
    c.sweep.points = (5.0, 10.0, 20.0, 40.0)
    c.workload.num_requests = 1000
    c.workload.prompt_len = cl.length_dist(median=512.0, sigma=1.0, low=16, tail_fraction=0.15,
                                        tail_low=4096, tail_high=7936)
    c.workload.output_len = cl.length_dist("uniform", low=64, high=256)
  return c
