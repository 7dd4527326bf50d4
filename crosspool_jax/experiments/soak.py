"""The operability soak: a running engine under random cancels, memory-limit changes and a model
arriving and one retiring, checked against the reference generation.

Invariant checked at the end: every page and expert slot is back, nothing compiled after
start-up except the arriving model, and a sample of the finished requests' tokens equals
`models.decode.generate` (greedy) token for token.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from crosspool_jax.engine import Engine, EngineConfig, Status
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params


@dataclasses.dataclass(frozen=True)
class SoakConfig:
  """Settings of one soak.

  Attributes:
    policy: the engine's memory organisation ("static" is excluded: its reservations leave
      no limit to move).
    requests: requests submitted over the run.
    seed: seed of the models, the workload and the random events.
    sample: finished greedy requests checked against the reference.
    cancel_fraction: share of the requests cancelled while waiting or running.
    limit_every: engine steps between two random KV (and expert-slot) limit changes.
    max_prompt, max_new: longest prompt and output of a request (tokens).
    arrivals_per_step: requests submitted per engine step.
  """

  policy: str = "shared"
  requests: int = 10_000
  seed: int = 0
  sample: int = 64
  cancel_fraction: float = 0.05
  limit_every: int = 25
  max_prompt: int = 12
  max_new: int = 4
  arrivals_per_step: int = 12

  def __post_init__(self):
    if self.policy not in ("shared", "crosspool"):
      raise ValueError(f"policy must be 'shared' or 'crosspool', got {self.policy!r}")
    if self.requests < 3 or self.sample < 1:
      raise ValueError(f"requests must be >= 3 and sample >= 1, got {self.requests}, "
                       f"{self.sample}")


FLEET = ("mixtral", "qwen3_moe", "olmoe")  # served from the start
RETIRING = "qwen3_moe"  # unregistered at two thirds of the submissions
ARRIVING = "qwen2_moe"  # registered at one third
MAX_CONTEXT = 32


def _engine(config: SoakConfig) -> Engine:
  common = dict(page_elems=512, token_budget=64, token_buckets=(16, 64), max_batch=8,
                attn_impl="reference", moe_impl="reference")
  if config.policy == "crosspool":
    return Engine(EngineConfig(kv_policy="crosspool", devices=(0, 1), weight_devices=(2, 3),
                               pages_per_device=48, expert_slots_per_device=16,
                               expert_policy="lru", **common))
  return Engine(EngineConfig(kv_policy="shared", pages_per_device=96, **common))


def run_soak(config: SoakConfig, log: Callable[[str], None] = lambda msg: None) -> dict:
  """Runs the soak; returns its counts, rate and checks (see the module docstring).

  The crosspool policy needs 4 devices (`jax_num_cpu_devices` on CPU).
  """
  rng = np.random.default_rng(config.seed)
  models = {f: (tiny_config(f), init_params(tiny_config(f), seed=config.seed + i))
            for i, f in enumerate((*FLEET, ARRIVING))}
  eng = _engine(config)
  for i, f in enumerate(FLEET):
    eng.register_model(f, cfg=models[f][0], params=models[f][1], max_context=MAX_CONTEXT,
                       group=i % 2 if config.policy == "crosspool" else 0)
  eng.start()
  pool = eng.pools[0]
  min_pages = 2 * pool.capacity // 10
  serving = list(FLEET)
  work: dict[str, tuple[str, list[int], int]] = {}
  unregistered: list[str] = []
  recent: collections.deque[str] = collections.deque(maxlen=4 * config.arrivals_per_step)
  limit_changes = steps = 0
  start = time.perf_counter()
  while len(work) < config.requests or eng.scheduler.has_work():
    for _ in range(min(config.arrivals_per_step, config.requests - len(work))):
      model = serving[int(rng.integers(len(serving)))]
      prompt = rng.integers(0, 512, size=int(rng.integers(1, config.max_prompt + 1))).tolist()
      new = int(rng.integers(1, config.max_new + 1))
      rid = eng.submit(model_id=model, prompt_ids=prompt, max_new_tokens=new)
      work[rid] = (model, prompt, new)
      recent.append(rid)
      if len(work) == config.requests // 3:
        eng.register_model(ARRIVING, cfg=models[ARRIVING][0], params=models[ARRIVING][1],
                           max_context=MAX_CONTEXT, group=1 if config.policy == "crosspool"
                           else 0)
        serving.append(ARRIVING)
        log(f"registered {ARRIVING} after {len(work)} requests")
      elif len(work) == 2 * config.requests // 3:
        unregistered = eng.unregister_model(RETIRING)
        serving.remove(RETIRING)
        log(f"unregistered {RETIRING} after {len(work)} requests ({len(unregistered)} of its "
            "requests cancelled)")
    for rid in recent:  # each request is recent for about 4 steps
      if (eng.status(rid) in (Status.WAITING, Status.RUNNING)
          and rng.random() < config.cancel_fraction / 4):
        eng.cancel(rid)
    if steps % config.limit_every == 0:
      done = len(work) >= config.requests
      pages = pool.capacity if done else int(rng.integers(min_pages, pool.capacity + 1))
      slots = None
      if config.policy == "crosspool":
        slots = 16 if done else int(rng.integers(8, 17))
      eng.set_memory_limit(kv_pages=pages, expert_slots=slots)
      limit_changes += 1
    eng.step()
    steps += 1
    if steps % 200 == 0:
      log(f"[{time.perf_counter() - start:6.1f}s] step {steps}: {len(work)} submitted, "
          f"KV {pool.used_pages}/{pool.limit} pages")
  wall_s = time.perf_counter() - start
  metrics = eng.metrics()  # before the reference generation compiles

  status = {r: eng.status(r) for r in work}
  finished = [r for r in work if status[r] == Status.FINISHED]
  checked = equal = 0
  picks = rng.choice(len(finished), size=min(config.sample, len(finished)), replace=False)
  by_key: dict[tuple[str, int], list[str]] = {}
  for i in sorted(picks):
    rid = finished[i]
    by_key.setdefault((work[rid][0], work[rid][2]), []).append(rid)
  for (model, new), rids in by_key.items():
    cfg, params = models[model]
    refs = generate(params, cfg, [work[r][1] for r in rids], max_new_tokens=new)
    for rid, ref in zip(rids, refs, strict=True):
      checked += 1
      equal += eng.output(rid) == ref
  for p in eng.pools.values():
    p.check_invariants()
  slots_left = 0
  if eng.weights_pool is not None:
    eng.weights_pool.pool.check_invariants()
    slots_left = sum(k[0] == RETIRING for k in eng.weights_pool.pool.resident_keys())
  return {
      "policy": config.policy, "seed": config.seed, "requests": len(work),
      "finished": len(finished),
      "cancelled": sum(status[r] == Status.CANCELLED for r in work) - len(unregistered),
      "unregistered": len(unregistered),
      "failed": sum(status[r] == Status.FAILED for r in work),
      "preemptions": sum(p.preemptions for p in eng.pools.values()),
      "limit_changes": limit_changes, "steps": steps, "wall_s": wall_s,
      "requests_per_s": len(work) / wall_s,
      "sample_checked": checked, "sample_equal": int(equal),
      "compiles_after_start": metrics["backend_compiles_since_start"],
      "compiles_registering": metrics["backend_compiles_registering"],
      "pages_in_use_at_end": sum(p.used_pages for p in eng.pools.values()),
      "slots_of_retired_model": slots_left,
  }
