r"""The longest context each organisation serves at a fixed memory budget.

  python scripts/run_experiment.py --config=configs/experiments/longest_context.py:cpu
  python scripts/run_experiment.py --config=configs/experiments/longest_context.py:full \
      --config.fleet.m0.checkpoint=DIR0 ... --config.fleet.m7.checkpoint=DIR7

Requests whose prompts grow from short to beyond what any one device can hold, one at a time
(low rate), on the same budget for every policy. `static` is capped by its reservation,
`shared` by one device's pool, `crosspool` by the KV pool over all KV devices (a sequence's
pages spread over them; attention runs per device and merges by LSE). Read "longest ctx" and
the rejections; `scripts/capacity.py` gives the same limits in closed form at paper scale.
"""

from __future__ import annotations

from crosspool_jax.experiments.config_lib import (
  cpu_fleet,
  engine_block,
  experiment_base,
  full_scale,
  length_dist,
  loop_fields,
  three_policies,
  workload_block,
)


def get_config(arg: str | None = None):
  variant = arg or "cpu"
  if variant not in ("cpu", "full"):
    raise ValueError(f"variant must be 'cpu' or 'full', got {arg!r}")
  c = experiment_base("longest_context", variant, "longest context served at one memory "
                      "budget: prompts from 64 to 3,800 tokens, one request at a time")
  c.fleet = cpu_fleet(4, max_context=4096)
  c.engine = engine_block(token_budget=256, token_buckets=(16, 256), max_batch=4)
  c.budget.device_bytes = 5 * 2**19
  c.policies = three_policies()
  c.workload = workload_block(
      popularity=",".join(c.fleet.keys()), num_requests=16, total_rate=0.5, cv=1.0,
      prompt_len=length_dist("uniform", low=64, high=3800),
      output_len=length_dist("constant", value=8))
  loop_fields(c, arrival_mode="logical", logical_step_s=0.05)
  if variant == "full":
    full_scale(c)
    c.workload.num_requests, c.workload.total_rate = 64, 0.2
    c.workload.prompt_len = length_dist("uniform", low=1024, high=8000)
    c.workload.output_len = length_dist("constant", value=64)
  return c
