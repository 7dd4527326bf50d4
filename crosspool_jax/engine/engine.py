"""The multi-model serving engine: register cold MoE models, submit requests, step, stream.

One engine serves every model under one memory organisation, the policy object that
`EngineConfig.kv_policy` names (`engine/policies/`; "static", "shared", "crosspool", ...), which
builds its pools and executor. Invariant: scheduling, sampling, limits and fault isolation are
the same for every policy. Usage: WORKSPACE.md, "The engine and its memory policies".
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from crosspool_jax.engine.backend import Backend, DeviceBackend
from crosspool_jax.engine.executors.api import LoadedModel, PeerLostError, StepError
from crosspool_jax.engine.executors.colocated import ColocatedExecutor
from crosspool_jax.engine.executors.crosspool import DisaggregatedExecutor
from crosspool_jax.engine.metrics import request_metrics, step_kind, steps_by_kind, summarize
from crosspool_jax.engine.policies import Runtime, get_policy
from crosspool_jax.engine.request import Request, Status
from crosspool_jax.engine.scheduler import Scheduler
from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.sampling import SamplingParams
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool

_BACKEND_COMPILES = [0]  # process-wide count of XLA backend compilations since the first start()
_counting_compiles = False  # whether `_count_compiles` listens (registered by the first start())


def _count_compiles(event: str, duration_s: float, **kwargs) -> None:
  del duration_s, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _BACKEND_COMPILES[0] += 1


def _start_counting_compiles() -> None:
  """Registers the process-wide compile counter with `jax.monitoring`, once."""
  global _counting_compiles
  if not _counting_compiles:
    jax.monitoring.register_event_duration_secs_listener(_count_compiles)
    _counting_compiles = True


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Engine settings (the `serve.py` config's `engine` block).

  Attributes:
    kv_policy: the memory policy, a name of `engine.policies.POLICIES` ("static", "shared",
      "crosspool", ...); it validates the rest of the config.
    page_elems: elements per KV page; every model's elements per token must divide it: 2 x
      kv_heads x head_dim (K and V), or a latent-attention model's one row of kv_lora_rank +
      qk_rope_head_dim.
    pages_per_device: pages of each KV group's buffer, the null page included.
    kv_dtype: dtype of the KV pages.
    token_budget: tokens fed per iteration over all models (chunked prefill splits prompts).
    max_prefill_chunk: prompt tokens one request feeds per iteration at most (0: as many as
      the budget allows). A long prompt then prefills over more steps, and each step carrying
      one of its chunks stays short for the decodes batched beside it: their time between
      tokens falls, its time to first token rises (vLLM's `long_prefill_token_threshold`).
    short_prefills_first: within a model, requests whose pending tokens fit one chunk
      (`max_prefill_chunk`, or the budget when it is 0) are fed before those whose do not,
      whether running or waiting: a short prompt arriving behind a long one gets its first
      token without waiting for the whole long prompt, and the long prompt feeds what the
      short ones leave of the model's share (so under sustained short traffic it waits:
      shortest-first's trade). False: first come, first served (running requests, then
      waiting ones, in arrival order).
    token_buckets: padded token counts per model step, compiled at start-up.
    max_batch: sequences per model step.
    attn_impl, moe_impl: kernel implementations (None: Pallas on GPU/TPU, jnp on CPU).
    devices: device index of each KV group (models are placed in groups at registration);
      under a weights-pool policy (crosspool*), the KV-pool devices (one pool over them all).
    weight_devices: crosspool* only: the weights-pool devices.
    micro_batches: crosspool* only: micro-batches of the layer-wise pipeline (1 = none).
    micro_batch_min_tokens: crosspool* only: a model batch is cut into micro-batches only if
      each gets at least this many tokens (small decode batches are launch-bound: splitting
      them doubles their programs and transfers and overlaps nothing worth it); 0 = always.
    expert_slots_per_device: crosspool* only: expert slots of each shape class per weights
      device (fewer than the fleet's experts: the hot ones stay, the rest are swapped in).
    expert_policy: crosspool* only: "pin_all", "lru", "lfu" or "activation_aware".
    fuse_experts: crosspool* only: per layer, the micro-batches whose MoE layer has the same
      expert shape class and home weights device share one expert-dispatch call (False: one
      call per micro-batch, the ablation).
    timeline_every: record the executor's timeline of every Nth step (the pipeline overlap in
      `metrics()`, `pipeline.png`); 0 = none. crosspool*: each stage (a watcher thread waits
      on each stage's output, host time, so serving records only a sample); static/shared:
      each model program (no thread: its tokens are read anyway).
    decode_steps_per_dispatch: a decode-only model batch runs up to this many decode steps in
      one dispatch (KV pages reserved for them first, never by preemption): static/shared in
      one on-device loop, crosspool* as a chunk of steps enqueued with no read between them
      when its pages are on its home KV device (the iteration's other batches run the first
      step beside it); its tokens all get the dispatch's end as their time, so TBT within a
      dispatch reads 0.
      1 = one step per dispatch.
  """

  kv_policy: str = "shared"
  page_elems: int = 2048
  pages_per_device: int = 512
  kv_dtype: str = "float32"
  token_budget: int = 256
  max_prefill_chunk: int = 0
  short_prefills_first: bool = False
  token_buckets: tuple[int, ...] = (16, 64, 256)
  max_batch: int = 8
  attn_impl: str | None = None
  moe_impl: str | None = None
  devices: tuple[int, ...] = (0,)
  weight_devices: tuple[int, ...] = ()
  micro_batches: int = 2
  micro_batch_min_tokens: int = 0
  expert_slots_per_device: int = 64
  expert_policy: str = "lru"
  fuse_experts: bool = True
  timeline_every: int = 16
  decode_steps_per_dispatch: int = 1

  def __post_init__(self):
    if not isinstance(self.decode_steps_per_dispatch, int) or self.decode_steps_per_dispatch < 1:
      raise ValueError(f"decode_steps_per_dispatch must be an integer >= 1, got "
                       f"{self.decode_steps_per_dispatch!r}")
    if self.token_budget < 1 or self.max_batch < 1:
      raise ValueError(f"token_budget and max_batch must be >= 1, got {self.token_budget}, "
                       f"{self.max_batch}")
    if not self.devices:
      raise ValueError("devices must name at least one KV group device")
    if not isinstance(self.max_prefill_chunk, int) or self.max_prefill_chunk < 0:
      raise ValueError(f"max_prefill_chunk must be an integer >= 0 (0: no limit), got "
                       f"{self.max_prefill_chunk!r}")
    if not isinstance(self.short_prefills_first, bool):
      raise ValueError(f"short_prefills_first must be a bool, got {self.short_prefills_first!r}")
    if self.micro_batch_min_tokens < 0:
      raise ValueError(f"micro_batch_min_tokens must be >= 0, got {self.micro_batch_min_tokens}")
    if self.timeline_every < 0:
      raise ValueError(f"timeline_every must be >= 0 (0: no timeline), got "
                       f"{self.timeline_every}")
    get_policy(self.kv_policy).validate(self)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """A generated token (streamed), or the end of a request (`finished` set, token may be None)."""

  request_id: str
  model_id: str
  token: int | None
  finished: bool = False
  finish_reason: str | None = None


class Engine:
  """Continuous batching over many models sharing the KV memory (see the module docstring)."""

  def __init__(self, config: EngineConfig | None = None, *,
               log: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.perf_counter,
               backend: Backend | None = None):
    """Args:
      config: the engine settings (default `EngineConfig()`).
      log: where start-up and failure messages go.
      clock: seconds now; every time a request records (arrival, admission, tokens, finish)
        and the pool samples are read from it (a simulator passes its simulated clock).
      backend: where the models and runtime live (default `DeviceBackend`: the devices).
    """
    self.config = config or EngineConfig()
    self.policy = get_policy(self.config.kv_policy)
    self.log = log or (lambda msg: None)
    self.clock = clock
    self.backend = backend or DeviceBackend()
    self._models: dict[str, LoadedModel] = {}
    self._specs: dict[str, KVModelSpec] = {}
    self._requests: dict[str, Request] = {}
    self._ids = itertools.count()
    self._started = False
    self._runtime: Runtime | None = None
    self.scheduler: Scheduler | None = None
    self.pool_samples: list[dict] = []
    self.steps = 0
    self.step_log: list[tuple[str, float, int]] = []  # (step_kind, seconds, tokens) per step
    self.compile_count_at_start = 0
    self.compiles_registering = 0  # XLA compilations of models registered after start()
    self._compiles_at_start = 0
    self._last_step_idle = False

  @property
  def pools(self) -> dict[int, KVPool]:
    """The KV pools by KV group (one per group when colocated, one under 0 for crosspool*)."""
    return self._runtime.pools if self._runtime else {}

  @property
  def executor(self) -> ColocatedExecutor | DisaggregatedExecutor | None:
    return self._runtime.executor if self._runtime else None

  @property
  def weights_pool(self) -> DeviceWeightsPool | None:
    """The device weights pool (None before start and under a policy without one)."""
    return self._runtime.weights_pool if self._runtime else None

  # --- setup ------------------------------------------------------------------------------

  def register_model(self, model_id: str, *, checkpoint: str | None = None,
                     cfg: ModelConfig | None = None, params: dict | None = None,
                     max_batch: int | None = None, max_context: int | None = None,
                     group: int = 0, dtype=None) -> None:
    """Adds a model, before or after `start()`: from a checkpoint dir (HF or orbax) or cfg +
    params.

    On a started engine (a cold model arrives) the model joins its KV pool and, under
    crosspool, the weights pool (its experts must join an existing shape class: the pool's
    budget was split among the classes at start), and its executables are compiled while the
    other models' requests wait between steps, untouched. On any error nothing is registered.

    Args:
      model_id: unique name requests refer to.
      checkpoint: HF or orbax checkpoint directory (or give `cfg` and `params`).
      max_batch: concurrent requests of this model (default: the engine's max_batch).
      max_context: longest prompt + output served (default: the model's max context).
      group: index into `EngineConfig.devices`: the model's KV group (static, shared), or
        under crosspool its home KV device (its non-expert weights and the per-token work
        outside attention and experts; its KV pages may be on any KV device).
      dtype: param dtype when loading a checkpoint.
    """
    if model_id in self._models:
      raise ValueError(f"model {model_id!r} is already registered")
    if (checkpoint is None) == (params is None):
      raise ValueError("give either checkpoint or cfg + params")
    if checkpoint is not None:
      cfg, params = load_checkpoint(checkpoint, dtype=dtype)
    if cfg is None:
      raise ValueError("params need their cfg")
    if not 0 <= group < len(self.config.devices):
      raise ValueError(f"group {group} is not one of the {len(self.config.devices)} KV groups")
    max_context = min(max_context or cfg.max_context, cfg.max_context)
    model = LoadedModel(model_id, cfg, self.backend.place(self.config, params, group), group)
    spec = KVModelSpec(model_id, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_context,
                       max_batch or self.config.max_batch, stores=cfg.kv_stores)
    if self._started:
      before = _BACKEND_COMPILES[0]
      self._add_running(model, spec)
      self.compiles_registering += _BACKEND_COMPILES[0] - before
    self._models[model_id] = model
    self._specs[model_id] = spec

  def _add_running(self, model: LoadedModel, spec: KVModelSpec) -> None:
    """Joins a model to the pools, executor and scheduler of a started engine (all or none)."""
    self.backend.add_model(self.policy, self._runtime, self.config, model, spec, log=self.log)
    self.scheduler.add_model(model.model_id, self._runtime.model_pools[model.model_id])

  def unregister_model(self, model_id: str) -> list[str]:
    """Removes a model (a cold model retires), before or after `start()`.

    Its waiting and running requests are cancelled (finish_reason "unregistered"), not
    drained: to drain, stop submitting to it and step until it has no requests left. Its KV
    pages (and under static its reservation) and its expert slots return to the pools; the
    other models' requests continue untouched. Returns the cancelled request ids.
    """
    if model_id not in self._models:
      raise ValueError(f"unknown model_id {model_id!r}; registered: {sorted(self._models)}")
    cancelled = []
    if self._started:
      now = self.clock()
      for req in self.scheduler.remove_model(model_id):
        req.status, req.finish_reason, req.finish_s = Status.CANCELLED, "unregistered", now
        cancelled.append(req.request_id)
      self.executor.remove_model(model_id)
      if self.weights_pool is not None:
        self.weights_pool.unregister(model_id)
      self._runtime.model_pools.pop(model_id).unregister_model(model_id)
    del self._models[model_id], self._specs[model_id]
    return cancelled

  def set_memory_limit(self, *, kv_pages: int | None = None, kv_bytes: int | None = None,
                       expert_slots: int | None = None, group: int | None = None) -> dict:
    """Changes the memory the engine may use, while serving (between steps).

    KV: each KV pool (`pools`: one per KV group under static/shared, one under crosspool;
    `group` picks one) may then hold `kv_pages` pages, or as many as fit in `kv_bytes`
    (bytes per pool, null pages excluded). Lowering preempts requests by the pool's victim
    rule (most recently admitted first); they go back to the queue and are recomputed later,
    exactly. Raising lets waiting requests in again. Expert slots (crosspool only): every
    shape class may hold `expert_slots` experts per weights device; lowering evicts by the
    expert policy (later accesses swap them back in). The buffers keep their size: a limit
    caps what is used of them.

    Returns:
      {"preempted": request ids, "evicted_experts": number of experts evicted}.
    Raises:
      ValueError: an argument out of range (nothing is changed then).
    """
    if not self._started:
      raise RuntimeError("set_memory_limit: the engine has not started")
    if kv_pages is not None and kv_bytes is not None:
      raise ValueError("give kv_pages or kv_bytes, not both")
    if group is not None and group not in self.pools:
      raise ValueError(f"group {group} has no KV pool; pools: {sorted(self.pools)}")
    pools = list(self.pools.values()) if group is None else [self.pools[group]]
    page_bytes = self.config.page_elems * jnp.dtype(self.config.kv_dtype).itemsize
    pages = kv_pages if kv_bytes is None else kv_bytes // page_bytes
    if pages is not None:
      for pool in pools:
        if not isinstance(pages, int) or not 0 <= pages <= pool.capacity:
          raise ValueError(f"KV limit must be an integer number of pages in [0, "
                           f"{pool.capacity}] (pages of {page_bytes} B), got {pages!r}")
    evicted = []
    if expert_slots is not None:
      if self.weights_pool is None:
        raise ValueError(f"expert_slots: policy {self.config.kv_policy!r} has no weights pool")
      host = self.weights_pool.pool
      for c in range(len(host.classes)):
        host.check_slot_limit(c, expert_slots)
      for c in range(len(host.classes)):
        evicted += host.set_slot_limit(c, expert_slots)
    preempted = []
    if pages is not None:
      for pool in pools:
        preempted += pool.set_limit(pages)
    self.scheduler.requeue_evicted()
    return {"preempted": preempted, "evicted_experts": len(evicted)}

  def start(self) -> None:
    """Creates the KV pools and buffers, and compiles every bucket of every model."""
    if self._started:
      raise RuntimeError("engine already started")
    if not self._models:
      raise RuntimeError("register at least one model before start()")
    _start_counting_compiles()
    c = self.config
    self._runtime = self.backend.start(self.policy, c, self._models, self._specs)
    self.scheduler = Scheduler(self._runtime.model_pools, token_budget=c.token_budget,
                               max_batch=c.max_batch, max_tokens=c.token_buckets[-1],
                               decode_steps=c.decode_steps_per_dispatch,
                               max_prefill_chunk=c.max_prefill_chunk,
                               short_prefills_first=c.short_prefills_first)
    start = time.perf_counter()
    self.compile_count_at_start = self.executor.compile_all(log=self.log)
    self.log(f"compiled {self.compile_count_at_start} executables in "
             f"{time.perf_counter() - start:.1f}s")
    self._compiles_at_start = _BACKEND_COMPILES[0]
    self._started = True

  # --- requests ---------------------------------------------------------------------------

  def submit(self, *, model_id: str, prompt_ids: Sequence[int], max_new_tokens: int,
             sampling: SamplingParams | None = None, stop_ids: Sequence[int] = (),
             request_id: str | None = None) -> str:
    """Queues a request; returns its id. Invalid input raises ValueError and changes nothing.

    Args:
      model_id: a registered model.
      prompt_ids: non-empty prompt token ids, each in [0, vocab_size).
      max_new_tokens: >= 1; prompt + max_new_tokens must fit the model's max context.
      sampling: SamplingParams (default greedy).
      stop_ids: generated tokens that end the request.
      request_id: optional unique id (default: generated).
    """
    if not self._started:
      raise RuntimeError("call start() before submit()")
    if model_id not in self._models:
      raise ValueError(f"unknown model_id {model_id!r}; registered: {sorted(self._models)}")
    cfg, spec = self._models[model_id].cfg, self._specs[model_id]
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
      raise ValueError("prompt_ids is empty")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt_ids has ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if len(prompt) + max_new_tokens > spec.max_context:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                       f"exceeds model {model_id!r} max context {spec.max_context}")
    pool = self.scheduler.pools[model_id]
    need = math.ceil((len(prompt) + max_new_tokens) / pool.page_tokens(model_id)) * cfg.num_layers
    if need > pool.capacity:
      raise ValueError(f"prompt + max_new_tokens needs {need} KV pages of model {model_id!r}, "
                       f"the whole pool has {pool.capacity}")
    sampling = sampling or SamplingParams()
    if not isinstance(sampling, SamplingParams):
      raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    request_id = request_id or f"req-{next(self._ids)}"
    if request_id in self._requests:
      raise ValueError(f"request_id {request_id!r} already exists")
    req = Request(request_id, model_id, prompt, sampling, max_new_tokens,
                  frozenset(int(s) for s in stop_ids), arrival_s=self.clock())
    self._requests[request_id] = req
    self.scheduler.add(req)
    return request_id

  def cancel(self, request_id: str) -> None:
    """Cancels a waiting or running request; its pages return to the pool at once."""
    req = self._get(request_id)
    if req.done:
      return
    self.scheduler.remove(req)
    req.status, req.finish_reason, req.finish_s = Status.CANCELLED, "cancelled", self.clock()

  def _get(self, request_id: str) -> Request:
    if request_id not in self._requests:
      raise KeyError(f"unknown request_id {request_id!r}")
    return self._requests[request_id]

  def output(self, request_id: str) -> list[int]:
    """Tokens generated so far."""
    return list(self._get(request_id).output_ids)

  def kv_pool(self, model_id: str) -> KVPool:
    """The KV pool a registered model's requests draw pages from (after `start()`)."""
    if not self._started:
      raise RuntimeError("kv_pool: the engine has not started")
    if model_id not in self._runtime.model_pools:
      raise ValueError(f"unknown model_id {model_id!r}")
    return self._runtime.model_pools[model_id]

  def status(self, request_id: str) -> Status:
    return self._get(request_id).status

  # --- serving loop -----------------------------------------------------------------------

  def step(self) -> list[TokenEvent]:
    """One iteration: schedule, run each model's batch, sample, stream the new tokens."""
    events = []
    batches = self.scheduler.schedule()
    self._last_step_idle = not batches
    now = self.clock()
    for batch in batches:
      for r in batch.requests:
        if r.admitted_s is None:
          r.admitted_s = now
    started = now
    try:
      results = self.executor.run_many(batches) if batches else []
    except StepError as e:
      events = self._isolate_failure(batches, e)
      self.steps += 1
      self._sample_pools()
      return events
    except PeerLostError as e:
      self._fail_unfinished(e)
      raise
    now = self.clock()  # the time of every token of the step (of a multi-step dispatch)
    for batch, tokens in zip(batches, results, strict=True):
      commit = self.scheduler.commit if batch.decode_steps is None else self.scheduler.commit_many
      for r, tok, reason in commit(batch, tokens, now):
        events.append(TokenEvent(r.request_id, r.model_id, tok, reason is not None, reason))
    if batches:
      self.step_log.append((step_kind(batches), now - started,
                            sum(e.token is not None for e in events)))
    self.steps += 1
    self._sample_pools()
    return events

  def _isolate_failure(self, batches: list, error: StepError) -> list[TokenEvent]:
    """A model's step raised: its in-flight requests fail with the reason, their pages return;
    buffers the failed call consumed are re-allocated (requests whose pages were lost with
    them are recomputed); the other models' requests of this step simply run again next step
    (their tokens' keys and KV positions are the same: exact)."""
    self.log(f"step {self.steps}: {error}")
    for pool in self.executor.restore_lost_buffers():
      for req in self.scheduler.running():
        if self._runtime.model_pools[req.model_id] is pool:
          pool.release(req.request_id)
    self.scheduler.requeue_evicted()
    now, events = self.clock(), []
    reason = f"{type(error.cause).__name__}: {error.cause}"
    for batch in batches:
      if batch.model_id not in error.model_ids:
        continue
      for r in batch.requests:
        self.scheduler.remove(r)
        r.status, r.finish_reason, r.error, r.finish_s = Status.FAILED, "error", reason, now
        events.append(TokenEvent(r.request_id, r.model_id, None, True, "error"))
    return events

  def _fail_unfinished(self, error: PeerLostError) -> None:
    """Another process of a multi-process run is gone: every unfinished request (running or
    waiting: none can be served) fails with the reason, its pages return, and the log names
    them."""
    now, failed = self.clock(), []
    for r in self._requests.values():
      if not r.done:
        self.scheduler.remove(r)
        r.status, r.finish_reason, r.error, r.finish_s = Status.FAILED, "error", str(error), now
        failed.append(r.request_id)
    self.log(f"step {self.steps}: {error}; {len(failed)} unfinished request(s) failed: "
             f"{', '.join(failed)}")

  def _sample_pools(self) -> None:
    t = self.clock()
    for g, pool in self.pools.items():
      self.pool_samples.append({"t": t, "group": g, "used_pages": pool.used_pages,
                                "limit_pages": pool.limit,
                                "utilization": pool.used_pages / max(1, pool.limit)})

  def run(self, max_steps: int | None = None) -> Iterator[TokenEvent]:
    """Steps until no request is left (or max_steps), yielding every token event.

    Also returns when requests are left but none can run: all wait for KV pages that a
    lowered memory limit withholds (raise it with `set_memory_limit`, then run again).
    """
    for n in itertools.count():
      if not self.scheduler.has_work() or (max_steps is not None and n >= max_steps):
        return
      yield from self.step()
      if self.blocked:
        return

  @property
  def blocked(self) -> bool:
    """Requests wait, none holds pages, and the last step could schedule none of them."""
    return (self._last_step_idle and self.scheduler.has_work()
            and not self.scheduler.running())

  def generate_all(self, max_steps: int | None = None) -> dict[str, list[int]]:
    """Runs to completion; returns every request's output."""
    for _ in self.run(max_steps):
      pass
    return {rid: list(r.output_ids) for rid, r in self._requests.items()}

  # --- metrics ----------------------------------------------------------------------------

  def metrics(self) -> dict:
    """Per-request and per-model latency percentiles, pool utilisation and compile counts."""
    pools = {}
    for g, pool in self.pools.items():
      samples = [s["utilization"] for s in self.pool_samples if s["group"] == g]
      pools[str(g)] = {"capacity_pages": pool.capacity, "page_elems": pool.page_elems,
                       "policy": pool.policy, "preemptions": pool.preemptions,
                       "peak_utilization": max(samples, default=0.0),
                       "mean_utilization": sum(samples) / len(samples) if samples else 0.0,
                       "used_pages_now": pool.used_pages}
    extra = {}
    if self.weights_pool is not None:
      extra["weights_pool"] = self.weights_pool.sync_stats().to_dict()
      extra["expert_calls"] = self.executor.expert_call_stats()
    timeline = getattr(self.executor, "timeline", None)
    if timeline is not None and timeline.enabled:
      extra["pipeline_overlap"] = timeline.overlap()
    return extra | {
        "summary": summarize(self._requests.values()),
        "requests": [request_metrics(r) for r in self._requests.values()],
        "pools": pools,
        "pool_timeline": self.pool_samples,
        "steps": self.steps,
        # steps that fed a prompt chunk and decode-only steps: their times and tokens
        "steps_by_kind": steps_by_kind(self.step_log),
        "compile_count": self.executor.compile_count if self.executor else 0,
        # the host's control cost: dispatches, transfers, blocking reads per step, µs per token
        "host": self.executor.counters.summary() if self.executor else {},
        "compile_count_at_start": self.compile_count_at_start,
        # XLA compilations in this process since start() (any code, not only the engine's).
        "backend_compiles_since_start": (_BACKEND_COMPILES[0] - self._compiles_at_start
                                         if self._started else 0),
        # of those, compilations of models registered after start()
        "backend_compiles_registering": self.compiles_registering,
        "config": dataclasses.asdict(self.config),
    }
