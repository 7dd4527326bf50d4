r"""Serving demo: a fleet of 4 tiny MoE models (3 KV shapes) under bursty, Zipf-skewed traffic.

  python scripts/serve.py --config=configs/serve/demo.py --workdir=/tmp/serve
  python scripts/serve.py --config=configs/serve/demo.py --config.engine.kv_policy=static \
      --workdir=/tmp/serve
  # CrossPool: attention + KV on CPU devices 0-1, the experts' weights pool on 2-3:
  python scripts/serve.py --config=configs/serve/demo.py --config.engine.kv_policy=crosspool \
      --config.num_cpu_devices=4 --config.engine.devices=0,1 \
      --config.engine.weight_devices=2,3 --workdir=/tmp/serve_crosspool
  # the small variant (2 models, 24 requests, seconds; what tests/test_serve.py runs):
  python scripts/serve.py --config=configs/serve/demo.py:runlocal --workdir=/tmp/serve_small

The models are initialised by our own code from (family, seed) — no checkpoint, no torch. To
serve a checkpoint instead, set a model's `checkpoint` (HF or orbax directory), e.g.
`--config.fleet.mixtral_0.checkpoint=DIR` (family and seed are then ignored).

Memory: pages_per_device is what the `static` policy needs for every model's max_context x
max_batch reservation, so both policies run on the same budget (a `shared` run needs less).
"""

from __future__ import annotations

import ml_collections

from crosspool_jax.experiments.config_lib import (
  config_variant,
  engine_block,
  fleet_entry,
  length_dist,
  loop_fields,
  workload_block,
)


def get_config(arg: str | None = None):
  """The demo config; arg "runlocal" gives the small variant (tests, a first try)."""
  variant = config_variant("demo", arg, ("demo", "runlocal"))
  small = variant == "runlocal"
  c = ml_collections.ConfigDict()
  c.variant = variant

  # The fleet: model id -> entry. KV shapes (kv_heads x head_dim): mixtral 2x16, qwen3_moe
  # 1x32, olmoe 4x16, qwen2_moe 2x16 (3 layers).
  ctx = 64 if small else 256
  c.fleet = ml_collections.ConfigDict()
  c.fleet.mixtral_0 = fleet_entry("mixtral", 0, max_batch=4, max_context=ctx)
  c.fleet.qwen3_1 = fleet_entry("qwen3_moe", 1, max_batch=4, max_context=ctx)
  if not small:
    c.fleet.olmoe_2 = fleet_entry("olmoe", 2, max_batch=4, max_context=ctx)
    c.fleet.qwen2_3 = fleet_entry("qwen2_moe", 3, max_batch=4, max_context=ctx)

  # 512-element pages hold 8 tokens of one layer for 2x16 and 1x32 heads, 4 for 4x16. static
  # needs sum(layers x ctx/page_tokens x batch): demo 256 + 256 + 512 + 384 = 1408 pages,
  # runlocal 64 + 64 = 128 (+ the null page).
  c.engine = engine_block(pages_per_device=129 if small else 1409,
                          token_budget=32 if small else 64,
                          token_buckets=(32,) if small else (16, 64))
  c.num_cpu_devices = 0  # > 0: ask JAX for that many CPU devices (several KV groups on CPU)

  # The traffic (crosspool_jax.workloads.WorkloadConfig), or a JSONL trace to replay.
  # Correlated bursts: a group of models (in the demo the two coldest) wakes up together.
  c.workload = workload_block(
      popularity="mixtral_0,qwen3_1" if small else "mixtral_0,qwen2_3,olmoe_2,qwen3_1",
      num_requests=24 if small else 100,
      total_rate=10.0 if small else 2.5,
      bursts=((("mixtral_0", "qwen3_1"), 0.5, 0.5, 4.0),) if small else
             ((("olmoe_2", "qwen3_1"), 10.0, 8.0, 4.0),),
      burst_duration_s=0.5 if small else 8.0,
      prompt_len=(length_dist(median=12.0, sigma=0.5, low=2, tail_fraction=0.1, tail_low=40,
                              tail_high=80) if small else
                  length_dist(median=32.0, sigma=0.6, low=4, tail_fraction=0.08, tail_low=128,
                              tail_high=384)),
      output_len=(length_dist("uniform", low=4, high=8) if small else
                  length_dist("uniform", low=8, high=32)))
  loop_fields(c)
  return c
