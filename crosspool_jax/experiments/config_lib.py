"""Building blocks of the ml_collections config files (`configs/serve`, `configs/experiments`).

Every block lists all of its fields, so any of them can be overridden from the command line
(`--config.fleet.mixtral_0.max_batch=8`, `--config.workload.cv=4`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from crosspool_jax.models.config import LATENT_FAMILIES
from crosspool_jax.workloads import LengthDist


def fleet_entry(family: str, seed: int, *, max_batch: int, max_context: int, group: int = 0,
                overrides: dict | None = None, dtype: str = "float32"):
  """One fleet model: a seeded tiny model of `family` (or a checkpoint directory, or a public
  reference shape with no weights: simulation only)."""
  return ml_collections.ConfigDict(dict(
      family=family,                            # tiny_config(family, **overrides), init(seed)
      seed=seed,
      overrides=ml_collections.ConfigDict(overrides or {}),  # ModelConfig fields
      checkpoint=config_dict.placeholder(str),  # HF or orbax dir; replaces family/seed
      # a capacity.REFERENCE_HF_CONFIGS name (e.g. "qwen3-30b-a3b"): the shape of a public
      # checkpoint, no weights; replaces family/seed; config.mode="sim" only
      reference=config_dict.placeholder(str),
      dtype=dtype,                              # param dtype
      max_batch=max_batch,                      # concurrent requests of this model
      max_context=max_context,                  # longest prompt + output served
      group=group,                              # KV group (colocated) / home KV device
  ))


def reference_fleet(references: dict[str, int], *, max_batch: int, max_context: int,
                    dtype: str = "bfloat16"):
  """Models of public reference shapes (no weights: simulation only): `{name: copies}`, each
  copy a fine-tune of its base (same shape, its own weights), ids `<name>_<i>` in order with
  the name's dots as underscores (a config field name has none: "qwen1_5-moe-a2_7b_0")."""
  fleet = ml_collections.ConfigDict()
  for name, copies in references.items():
    for i in range(copies):
      entry = fleet_entry("", i, max_batch=max_batch, max_context=max_context, dtype=dtype)
      entry.reference = name
      fleet[f"{name.replace('.', '_')}_{i}"] = entry
  return fleet


def sim_block(**kw):
  """How config.mode="sim" models the devices (`crosspool_jax.sim`): device kind, the
  models' weight dtype, efficiency factors per kind of stage, the expert routing model."""
  base = dict(
      device="h100_sxm",          # a roofline.DEVICES name: every device of every run
      # the dtype of every model's weights in the plan and the cost model; None: the fleet
      # entries' dtype (one for all)
      weight_dtype=config_dict.placeholder(str),
      # achieved fraction of the roofline per kind of stage (sim.cost_model.Efficiency)
      efficiency=ml_collections.ConfigDict(dict(attention=1.0, experts=1.0, head=1.0,
                                                transfer=1.0, swap=1.0)),
      # which experts a batch's tokens route to (sim.routing.Routing): uniform | zipf
      routing=ml_collections.ConfigDict(dict(kind="uniform", exponent=1.0, seed=0)),
      # the host's seconds per engine step, a model program's extra seconds the first time
      # it runs at a shape, one program's launch and one transfer's latency (None: the
      # device's estimates); scripts/calibrate.py fits them
      host_step_s=0.0,
      first_run_s=0.0,
      dispatch_s=config_dict.placeholder(float),
      link_latency_s=config_dict.placeholder(float),
  )
  return ml_collections.ConfigDict(base | kw)


def length_dist(kind: str = "lognormal", **kw):
  """A `crosspool_jax.workloads.LengthDist` as a config block (every field, for overrides)."""
  return ml_collections.ConfigDict(dataclasses.asdict(LengthDist(kind=kind, **kw)))


def engine_block(**kw):
  """`crosspool_jax.engine.EngineConfig`'s fields as a config block."""
  base = dict(
      kv_policy="shared",         # a memory policy: crosspool_jax.engine.policies.POLICIES
      page_elems=512,
      pages_per_device=129,
      kv_dtype="float32",
      token_budget=64,
      max_prefill_chunk=0,        # prompt tokens a request feeds per step at most (0: budget)
      short_prefills_first=False,  # a model's prompts that fit one chunk before longer ones
      token_buckets=(16, 64),
      max_batch=4,
      attn_impl=config_dict.placeholder(str),  # None: Pallas on GPU/TPU, jnp on CPU
      moe_impl=config_dict.placeholder(str),
      devices=(0,),
      # crosspool policies only: devices is then the KV pool, these the weights pool.
      weight_devices=(),
      micro_batches=2,            # layer-wise ping-pong (1 = no pipeline)
      micro_batch_min_tokens=0,   # cut a model batch only if each part gets this many tokens
      expert_slots_per_device=8,  # per shape class and weights device (< fleet experts: swap)
      expert_policy="lru",        # pin_all | lru | lfu | activation_aware
      fuse_experts=True,          # micro-batches of one shape class share an expert call
      timeline_every=16,          # stage timeline of every Nth step (0: none)
      # decode steps of a decode-only batch per dispatch (static/shared: an on-device loop;
      # crosspool*: a chunk of steps with no read between them, when its experts are resident)
      decode_steps_per_dispatch=1,
  )
  return ml_collections.ConfigDict(base | kw)


def workload_block(*, popularity: str, num_requests: int, total_rate: float, prompt_len,
                   output_len, **kw):
  """`crosspool_jax.workloads.WorkloadConfig`'s fields (or a trace to replay)."""
  base = dict(
      trace="",              # JSONL trace to replay; empty: generate from the fields below
      popularity=popularity,  # comma-separated model ids, most popular first
      num_requests=num_requests,
      total_rate=total_rate,  # requests/s over the fleet, outside bursts
      cv=2.0,                # inter-arrival coefficient of variation (1 = Poisson)
      zipf_exponent=1.0,
      bursts=(),             # ((model ids, start_s, duration_s, rate factor), ...)
      random_bursts=0,       # extra bursts drawn from the seed, shaped by the next 3 fields
      burst_group_size=2,
      burst_duration_s=1.0,
      burst_factor=4.0,
      prompt_len=prompt_len,
      output_len=output_len,
      prompt_low=3,          # prompt ids drawn from [prompt_low, vocab) (skip bos/eos)
      seed=0,
  )
  return ml_collections.ConfigDict(base | kw)


def loop_fields(c, *, arrival_mode: str = "trace", logical_step_s: float = 0.02,
                max_wall_s: float = 600.0) -> None:
  """The serving loop's settings (see `crosspool_jax.experiments.serving`), set on `c`."""
  c.sampling = ml_collections.ConfigDict(dict(temperature=0.8, top_k=50, top_p=0.95))
  c.stop_at_eos = False      # False: every request generates its trace's max_new_tokens
  # "trace": submit at arrival_s / replay_speed (wall clock); "logical": a clock advancing
  # logical_step_s per engine step (a schedule independent of the machine); "all_at_once".
  c.arrival_mode = arrival_mode
  c.replay_speed = 1.0       # > 1 compresses the trace's time
  c.logical_step_s = logical_step_s
  c.max_wall_s = max_wall_s  # then cancel what is left (reported), so a run always ends
  c.progress_interval_s = 1.0


# Tiny models shaped like real MoE checkpoints: routed experts are ~80% of the parameters
# (Mixtral 8x7B: 96%, Qwen1.5-MoE: 87%), so moving them to a weights pool frees most of a
# device, as it would at scale. tiny_config's own default (8 experts of d_ff 32) is ~50%.
MOE_HEAVY = dict(num_experts=16, d_ff_expert=64, max_position=4096)

CPU_FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")
# A tiny DeepSeek-V2's latent row of 56 + 8 elements: 8 tokens a page of 512 elements, as the
# K and V of 2 heads of 16 (tiny mixtral's), so it shares the CPU fleets' pages.
TINY_LATENT_ROW = dict(kv_lora_rank=56, head_dim=56 + 8)


def cpu_fleet(n: int, *, max_batch: int = 4, max_context: int = 2048,
              families: tuple[str, ...] = CPU_FAMILIES):
  """n seeded MoE-heavy tiny models cycling through `families`, ids `<family>_<i>` (a latent
  family with `TINY_LATENT_ROW`)."""
  fleet = ml_collections.ConfigDict()
  for i in range(n):
    family = families[i % len(families)]
    overrides = MOE_HEAVY | (TINY_LATENT_ROW if family in LATENT_FAMILIES else {})
    fleet[f"{family}_{i}"] = fleet_entry(family, i, max_batch=max_batch,
                                         max_context=max_context, overrides=overrides)
  return fleet


def three_policies(*, kv_devices=(0, 1), weight_devices=(2, 3), **crosspool):
  """static and shared on every device (one KV group each), crosspool split KV / weights."""
  every = tuple(kv_devices) + tuple(weight_devices)
  return ml_collections.ConfigDict(dict(
      static=dict(kv_policy="static", devices=every, weight_devices=()),
      shared=dict(kv_policy="shared", devices=every, weight_devices=()),
      crosspool=dict(kv_policy="crosspool", devices=tuple(kv_devices),
                     weight_devices=tuple(weight_devices), **crosspool),
  ))


def config_variant(name: str, arg: str | None, variants: tuple[str, ...]) -> str:
  """The variant a config file's argument (`--config=FILE:arg`) picks: `arg`, or the first of
  `variants` if empty; ValueError naming `name` and the variants otherwise."""
  variant = arg or variants[0]
  if variant not in variants:
    raise ValueError(f"{name}: the variant must be one of {variants}, got {arg!r}")
  return variant


def experiment_base(name: str, arg: str | None, description: str, *,
                    variants: tuple[str, ...] = ("cpu", "full")):
  """The fields every experiment config has besides the serving blocks.

  Args:
    name: the experiment (results go to workdir/<name>_<variant> by default).
    arg: the config file's argument (`--config=FILE:arg`); None picks the first variant.
    description: one line for the results and BENCHMARKS.md.
    variants: the variants this config has.
  """
  variant = config_variant(name, arg, variants)
  c = ml_collections.ConfigDict()
  c.name = name
  c.variant = variant
  c.description = description
  c.num_cpu_devices = 4      # > 0: ask JAX for that many CPU devices (ignored on GPU/TPU)
  # "run": serve on this machine's devices (measured); "sim": the same fleet, trace, budget
  # and policies served in simulated time on the devices of `sim` (crosspool_jax.sim)
  c.mode = "run"
  c.sim = sim_block()
  # > 0: the fleet is its entries repeated in order until it has this many models (copy k of
  # an entry: `<id>_c<k>`), so a sweep can vary the number of models; 0: the fleet as listed
  c.fleet_size = 0
  # a trained fleet directory (scripts/make_fleet.py), or "": each fleet entry with neither a
  # checkpoint nor a reference serves the next unused model of its family there (the base,
  # then its fine-tunes; after fleet_size)
  c.fleet_dir = ""
  # Same bytes on every device for every policy (0: engine.pages_per_device and the fleet's
  # groups as given); device_gib > 0 gives them in GiB instead of device_bytes (a sweep over
  # the memory reads in GiB); kv_planner: the crosspool runs split their devices
  # (engine.devices + weight_devices) by the KV planner, expert slots filling each weights
  # device (a run of `policies` may set its own kv_planner and weights_device_bytes).
  c.budget = ml_collections.ConfigDict(dict(device_bytes=0, device_gib=0.0,
                                            reserve_fraction=0.0, kv_planner=False))
  c.sweep = ml_collections.ConfigDict(dict(field="", points=()))
  c.slo = ml_collections.ConfigDict(dict(ttft_s=1.0, tbt_s=0.2))
  # Across processes (scripts/run_experiment.py started by scripts/launch_local.py): the
  # crosspool runs' KV and weights devices, named process:local_index (comma-separated); the
  # other runs are not served there (experiments/processes.py).
  c.processes = ml_collections.ConfigDict(dict(kv="0:0", weights="1:0"))
  return c


def cpu_setup(c, *, models: int = 4, max_context: int = 2048, device_bytes: int = 5 * 2**19,
              token_budget: int = 64, token_buckets=(16, 64),
              families: tuple[str, ...] = CPU_FAMILIES) -> None:
  """The CPU variant's fleet, engine, budget (per device) and the three policies, set on `c`."""
  c.fleet = cpu_fleet(models, max_context=max_context, families=families)
  # On CPU nothing overlaps (JAX runs each small program inline): a decode batch of a few
  # tokens cut into micro-batches only doubles its programs and transfers.
  c.engine = engine_block(token_budget=token_budget, token_buckets=tuple(token_buckets),
                          max_batch=4, micro_batch_min_tokens=16)
  c.budget.device_bytes = device_bytes
  c.policies = three_policies()


def full_scale(c, *, models: int = 8, family: str = "qwen2_moe", num_devices: int = 8,
               weight_devices: int = 3, device_gib: int = 80):
  """Turns `c` into its accelerator variant: `models` real checkpoints on `num_devices` chips.

  The checkpoints are given on the command line (`--config.fleet.m0.checkpoint=DIR`, e.g. a
  converted Qwen1.5-MoE-A2.7B); the run refuses to start without them. bf16 weights and KV,
  128 KiB pages (16 tokens of 16 x 128 KV heads), device memory as the budget; the paper's
  split of 8 chips, 3 of them the weights pool, is the one `scripts/capacity.py` finds for
  this fleet.
  """
  c.require_checkpoints = True
  c.num_cpu_devices = 0
  c.fleet = ml_collections.ConfigDict()
  for i in range(models):
    c.fleet[f"m{i}"] = fleet_entry(family, i, max_batch=16, max_context=8192, dtype="bfloat16")
  c.engine = engine_block(page_elems=65536, kv_dtype="bfloat16", token_budget=2048,
                          token_buckets=(64, 256, 1024, 2048), max_batch=16,
                          expert_slots_per_device=0)
  c.budget.device_bytes = device_gib * 2**30
  c.budget.reserve_fraction = 0.1
  kv = tuple(range(num_devices - weight_devices))
  c.policies = three_policies(kv_devices=kv, weight_devices=tuple(range(len(kv), num_devices)))
  c.workload.popularity = ",".join(c.fleet.keys())
  c.slo.ttft_s, c.slo.tbt_s = 2.0, 0.1


def paper_scale_workload(c, *, total_rate: float, burst_group_size: int) -> None:
  """The paper-scale experiments' traffic: 100 requests at `total_rate`, bursty (CV 4, two
  random 10 s bursts of `burst_group_size` models x4), long-context prompts (lognormal median
  1,024, a 10 % tail of 3-4 k tokens), 64-256 output tokens; arrivals on the trace clock."""
  c.workload = workload_block(
      popularity="", num_requests=100, total_rate=total_rate, cv=4.0, random_bursts=2,
      burst_group_size=burst_group_size, burst_duration_s=10.0, burst_factor=4.0,
      prompt_len=length_dist(median=1024.0, sigma=1.0, low=16, high=3072,
                             tail_fraction=0.1, tail_low=3072, tail_high=3968),
      output_len=length_dist("uniform", low=64, high=256))
  loop_fields(c, arrival_mode="trace")
  c.progress_interval_s = 10.0


def paper_scale_setup(c, *, references: dict[str, int], num_devices: int = 8,
                      weight_devices: int = 3, device: str = "h100_sxm",
                      device_gib: int = 80) -> None:
  """`references` ({reference shape: copies}: one base's fine-tunes, or a mixed fleet) on
  `num_devices` simulated devices, the four policies (static, shared on every device;
  crosspool* split KV / weights), bf16, 128 KiB pages, the device's memory as the budget;
  simulated."""
  c.mode = "sim"
  c.num_cpu_devices = 0
  c.sim.device = device
  c.fleet = reference_fleet(references, max_batch=16, max_context=4096)
  c.engine = engine_block(page_elems=65536, kv_dtype="bfloat16", token_budget=2048,
                             token_buckets=(64, 256, 1024, 2048), max_batch=16,
                             expert_slots_per_device=0, micro_batch_min_tokens=64,
                             timeline_every=0)
  c.budget.device_bytes = device_gib * 2**30
  c.budget.reserve_fraction = 0.1
  kv = tuple(range(num_devices - weight_devices))
  c.policies = three_policies(kv_devices=kv,
                                 weight_devices=tuple(range(len(kv), num_devices)))
  c.policies.crosspool_partitioned = ml_collections.ConfigDict(dict(
      kv_policy="crosspool_partitioned", devices=kv,
      weight_devices=tuple(range(len(kv), num_devices))))
  c.slo.ttft_s, c.slo.tbt_s = 2.0, 0.1
