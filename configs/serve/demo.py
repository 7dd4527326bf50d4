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
from ml_collections import config_dict


def _model(family: str, seed: int, *, max_batch: int, max_context: int, group: int = 0):
  """One fleet entry: a seeded tiny model of `family` (or a checkpoint directory)."""
  return ml_collections.ConfigDict(dict(
      family=family,                            # tiny_config(family), init_params(seed)
      seed=seed,
      overrides=ml_collections.ConfigDict(),    # ModelConfig fields for tiny_config(family)
      checkpoint=config_dict.placeholder(str),  # HF or orbax dir; overrides family/seed
      dtype="float32",                          # param dtype
      max_batch=max_batch,                      # concurrent requests of this model
      max_context=max_context,                  # longest prompt + output served
      group=group,                              # KV group: index into engine.devices
  ))


def _length(kind: str = "lognormal", **kw):
  """A `crosspool_jax.workloads.LengthDist` as a config block (every field, for overrides)."""
  base = dict(kind=kind, value=32, median=32.0, sigma=0.5, low=1, high=0, tail_fraction=0.0,
              tail_low=0, tail_high=0)
  return ml_collections.ConfigDict(base | kw)


def get_config(arg: str | None = None):
  """The demo config; arg "runlocal" gives the small variant (tests, a first try)."""
  variant = arg or "demo"
  if variant not in ("demo", "runlocal"):
    raise ValueError(f"config arg must be empty, 'demo' or 'runlocal', got {arg!r}")
  small = variant == "runlocal"
  c = ml_collections.ConfigDict()
  c.variant = variant

  # The fleet: model id -> entry. KV shapes (kv_heads x head_dim): mixtral 2x16, qwen3_moe
  # 1x32, olmoe 4x16, qwen2_moe 2x16 (3 layers).
  ctx = 64 if small else 256
  c.fleet = ml_collections.ConfigDict()
  c.fleet.mixtral_0 = _model("mixtral", 0, max_batch=4, max_context=ctx)
  c.fleet.qwen3_1 = _model("qwen3_moe", 1, max_batch=4, max_context=ctx)
  if not small:
    c.fleet.olmoe_2 = _model("olmoe", 2, max_batch=4, max_context=ctx)
    c.fleet.qwen2_3 = _model("qwen2_moe", 3, max_batch=4, max_context=ctx)

  # Mirrors crosspool_jax.engine.EngineConfig. 512-element pages hold 8 tokens of one layer
  # for 2x16 and 1x32 heads, 4 for 4x16. static needs sum(layers x ctx/page_tokens x batch):
  # demo 256 + 256 + 512 + 384 = 1408 pages, runlocal 64 + 64 = 128 (+ the null page).
  c.engine = ml_collections.ConfigDict(dict(
      kv_policy="shared",
      page_elems=512,
      pages_per_device=129 if small else 1409,
      kv_dtype="float32",
      token_budget=32 if small else 64,
      token_buckets=(32,) if small else (16, 64),
      max_batch=4,
      attn_impl=config_dict.placeholder(str),  # None: Pallas on GPU/TPU, jnp on CPU
      moe_impl=config_dict.placeholder(str),
      devices=(0,),
      # kv_policy="crosspool" only: devices is then the KV pool, these the weights pool.
      weight_devices=(),
      micro_batches=2,            # layer-wise ping-pong (1 = no pipeline)
      expert_slots_per_device=8,  # per shape class and weights device (< fleet experts: swap)
      expert_policy="lru",        # pin_all | lru | lfu | activation_aware
  ))
  c.num_cpu_devices = 0  # > 0: ask JAX for that many CPU devices (several KV groups on CPU)

  # The traffic (crosspool_jax.workloads.WorkloadConfig), or a JSONL trace to replay.
  c.workload = ml_collections.ConfigDict(dict(
      trace="",              # JSONL trace to replay; empty: generate from the fields below
      # comma-separated model ids, most popular first ("": the fleet's sorted ids)
      popularity="mixtral_0,qwen3_1" if small else "mixtral_0,qwen2_3,olmoe_2,qwen3_1",
      num_requests=24 if small else 100,
      total_rate=10.0 if small else 2.5,  # requests/s over the fleet, outside bursts
      cv=2.0,                # inter-arrival coefficient of variation (1 = Poisson)
      zipf_exponent=1.0,
      # Correlated bursts, (model ids, start_s, duration_s, rate factor): a group of models
      # (in the demo the two coldest) wakes up together.
      bursts=((("mixtral_0", "qwen3_1"), 0.5, 0.5, 4.0),) if small else
             ((("olmoe_2", "qwen3_1"), 10.0, 8.0, 4.0),),
      random_bursts=0,       # extra bursts drawn from the seed, shaped by the next 3 fields
      burst_group_size=2,
      burst_duration_s=0.5 if small else 8.0,
      burst_factor=4.0,
      prompt_len=(_length(median=12.0, sigma=0.5, low=2, tail_fraction=0.1, tail_low=40,
                          tail_high=80) if small else
                  _length(median=32.0, sigma=0.6, low=4, tail_fraction=0.08, tail_low=128,
                          tail_high=384)),
      output_len=(_length("uniform", low=4, high=8) if small else
                  _length("uniform", low=8, high=32)),
      prompt_low=3,          # prompt ids drawn from [prompt_low, vocab) (skip bos/eos)
      seed=0,
  ))
  c.sampling = ml_collections.ConfigDict(dict(temperature=0.8, top_k=50, top_p=0.95))
  c.stop_at_eos = False      # False: every request generates its trace's max_new_tokens

  # The serving loop.
  # "trace": submit at arrival_s / replay_speed (wall clock); "logical": a clock advancing
  # logical_step_s per engine step (a schedule independent of the machine); "all_at_once".
  c.arrival_mode = "trace"
  c.replay_speed = 1.0       # > 1 compresses the trace's time
  c.logical_step_s = 0.02
  c.max_wall_s = 600.0       # then cancel what is left (reported), so a run always ends
  c.progress_interval_s = 1.0
  return c
