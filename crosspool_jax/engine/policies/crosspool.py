"""`crosspool`: one KV pool over the KV devices, every model's routed experts in one weights pool.

Each model has a home KV device (`register_model(group=i)`: `EngineConfig.devices[i]`; planned
by the placement rule over its non-expert bytes) holding attention, embeddings, routers, shared
experts and dense MLPs; its KV pages may be on any KV device (a sequence spreads; attention per
device over local pages, LSE merge). The routed experts of every model sit in the weights pool
on `EngineConfig.weight_devices`: `expert_slots_per_device` slots per shape class per device,
shared by the models of the class (consolidation), the rest swapped in by `expert_policy`; per
layer, the micro-batches of one class and home weights device share one expert call
(`fuse_experts`). Executor: `DisaggregatedExecutor`. With `Budget.kv_planner` the plan also
chooses the split of KV and weights devices (`planner.best_split`). Invariant: a model's params
on its home device hold no routed expert; every one of them is in the weights pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from crosspool_jax.engine.executors.api import LoadedModel
from crosspool_jax.engine.executors.crosspool import DeviceSplit, DisaggregatedExecutor
from crosspool_jax.engine.policies.base import Budget, FleetModel, MemoryPolicy, Plan, Runtime
from crosspool_jax.engine.policies.placement import lay_out_kv, usable_bytes
from crosspool_jax.engine.policies.planner import best_split
from crosspool_jax.engine.policies.sizes import param_bytes
from crosspool_jax.pools.expert_policies import make_policy
from crosspool_jax.pools.kv_buffers import allocate_kv_buffers
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool
from crosspool_jax.pools.weights_pool import ExpertModelSpec, WeightsPool


def fused_token_buckets(config) -> tuple[int, ...]:
  """The padded token counts of a fused expert call: the token buckets, and the token budget
  if larger (a fused call holds one iteration's tokens at most)."""
  return tuple(sorted({*config.token_buckets, max(config.token_budget,
                                                  config.token_buckets[-1])}))


class CrossPoolPolicy(MemoryPolicy):
  """Disaggregated KV and consolidated expert pools (the module docstring)."""

  name = "crosspool"
  pools_experts = True

  def validate(self, config) -> None:
    make_policy(config.expert_policy)  # an unknown expert policy is named here

  def new_weights_pool(self, *, device_bytes: int, num_devices: int,
                       expert_policy: str) -> WeightsPool:
    """The host weights pool this policy serves with (empty)."""
    return WeightsPool(device_bytes=device_bytes, num_devices=num_devices, policy=expert_policy)

  def expert_layout(self, specs: list[ExpertModelSpec], num_devices: int) -> WeightsPool:
    """A pool of `new_weights_pool`'s kind with `specs` registered and a slot for each of
    their experts (none loaded): the shape classes and home devices this policy gives them."""
    room = max(s.num_pooled_experts for s in specs)
    pool = self.new_weights_pool(
        device_bytes=room * sum(s.shape_class.expert_bytes for s in specs),
        num_devices=num_devices, expert_policy="lru")
    for s in specs:
      pool.register_model(s, slots_per_device=room)
    return pool

  def serving_weights_pool(self, config, specs: list[ExpertModelSpec]) -> WeightsPool:
    """The empty host weights pool an engine serves `specs` with: `expert_slots_per_device`
    slots of each of their shape classes per weights device, `config.expert_policy`."""
    layout = self.expert_layout(specs, len(config.weight_devices))
    slot_bytes = sum(c.shape.expert_bytes for c in layout.classes)
    return self.new_weights_pool(device_bytes=slot_bytes * config.expert_slots_per_device,
                                 num_devices=len(config.weight_devices),
                                 expert_policy=config.expert_policy)

  # --- planning ---------------------------------------------------------------------------

  def _plan(self, fleet: Mapping[str, FleetModel], budget: Budget) -> Plan:
    if budget.kv_planner:
      return best_split(lambda b: self._plan_split(fleet, b), budget)
    return self._plan_split(fleet, budget)

  def _plan_split(self, fleet: Mapping[str, FleetModel], budget: Budget) -> Plan:
    """The plan at the budget's split of KV and weights devices."""
    if budget.weight_devices < 1:
      raise ValueError(f"budget: {self.name} needs at least one weights device")
    kv = lay_out_kv({m: f.cfg for m, f in fleet.items()},
                    {m: param_bytes(f.cfg, f.dtype)["non_expert"] for m, f in fleet.items()},
                    num_devices=budget.kv_devices, device_bytes=budget.device_bytes,
                    page_elems=budget.page_elems, page_bytes=budget.page_bytes,
                    reserve_fraction=budget.reserve_fraction, buffers_everywhere=True)
    not_fit = dict(kv.not_fit)
    pages = budget.kv_devices * (kv.pages_per_device - 1)
    for m in kv.page_tokens:
      if m not in not_fit and pages < fleet[m].cfg.num_layers:
        not_fit[m] = (f"{self.name}: {pages} KV pages cannot give one token a page in each of "
                      f"{fleet[m].cfg.num_layers} layers")
    served = [m for m in kv.page_tokens if m not in not_fit]
    w_usable = int(usable_bytes(budget.weights_device_bytes or budget.device_bytes,
                                budget.reserve_fraction))
    slots, experts = (self._expert_slots(fleet, served, budget, not_fit) if served
                      else (None, {"expert_bytes_per_weights_device": 0}))
    w_stranded = [w_usable - experts["expert_bytes_per_weights_device"]] * budget.weight_devices
    return Plan(self.name, dict(kv.placement.device), dict(kv.placement.tp),
                kv.pages_per_device,
                {m: fleet[m].max_context for m in served if m not in not_fit}, slots, not_fit,
                kv.accounting | {"weight_devices": budget.weight_devices} | experts
                | {"stranded_bytes_per_weights_device": w_stranded,
                   "stranded_bytes": kv.accounting["stranded_bytes"] + sum(w_stranded)})

  def _expert_slots(self, fleet: Mapping[str, FleetModel], served: list[str], budget: Budget,
                    not_fit: dict[str, str]) -> tuple[int, dict]:
    """Slots per shape class per weights device: as many as the budget holds, and unless the
    KV planner splits the devices, no more than keep every expert resident; fills `not_fit`
    with models one layer of which cannot fit."""
    specs = [ExpertModelSpec.from_config(m, fleet[m].cfg, fleet[m].dtype) for m in served]
    layout = self.expert_layout(specs, budget.weight_devices)
    need = [[0] * budget.weight_devices for _ in layout.classes]
    for s in specs:
      c = layout.model_class(s.model_id)
      for layer in s.moe_layers:
        need[c][layout.home_device(s.model_id, layer)] += s.num_experts
    per_slot = sum(c.shape.expert_bytes for c in layout.classes)
    w_bytes = budget.weights_device_bytes or budget.device_bytes
    fit = int(usable_bytes(w_bytes, budget.reserve_fraction) // per_slot)
    slots = fit if budget.kv_planner else min(fit, max(max(n) for n in need))
    for s in specs:
      if slots < s.num_experts:
        not_fit[s.model_id] = (
            f"a weights device of {w_bytes} B holds {fit} slot(s) per shape class, fewer than "
            f"num_experts={s.num_experts} (one layer's call may route to all of them)")
    return slots, {
        "weights_device_bytes": w_bytes,
        "expert_slots_per_device": slots,
        "expert_bytes_per_weights_device": slots * per_slot,
        "pooled_experts": sum(map(sum, need)),
        "resident_experts": sum(min(slots, n) for row in need for n in row),
        "resident_expert_fraction": {
            str(c.shape): sum(min(slots, n) for n in need[i]) / sum(need[i])
            for i, c in enumerate(layout.classes)},
    }

  def request_pages(self, plan: Plan, model_id: str) -> int:
    return plan.accounting["kv_devices"] * (plan.pages_per_device - 1)

  # --- pools and engine -------------------------------------------------------------------

  def kv_pools(self, specs, groups, *, page_elems, pages_per_device, kv_devices):
    pool = KVPool(page_elems=page_elems, pages_per_device=pages_per_device,
                  num_devices=kv_devices, policy="shared")  # one pool over every KV device
    for m, spec in specs.items():
      pool.register_model(spec, home_device=groups[m])  # pages local to its attention first
    return {0: pool}, dict.fromkeys(specs, pool)

  def start(self, config, models: dict[str, LoadedModel], specs: dict[str, KVModelSpec]
            ) -> Runtime:
    kv_devices, weight_devices = DeviceSplit(config.devices, config.weight_devices).resolve()
    pools, model_pools = self.kv_pools(specs, {m: model.group for m, model in models.items()},
                                       page_elems=config.page_elems,
                                       pages_per_device=config.pages_per_device,
                                       kv_devices=len(kv_devices))
    buffers = allocate_kv_buffers(pools[0], kv_devices, dtype=jnp.dtype(config.kv_dtype))
    weights_pool = DeviceWeightsPool(self.serving_weights_pool(
        config, [ExpertModelSpec.from_config(m, model.cfg,
                                             jax.tree.leaves(model.params)[0].dtype.name)
                 for m, model in models.items()]), devices=weight_devices)
    for m, model in models.items():
      stripped = weights_pool.register(m, model.cfg, model.params,
                                       slots_per_device=config.expert_slots_per_device)
      model.params = jax.device_put(stripped, kv_devices[model.group])
    fused_buckets = fused_token_buckets(config)
    executor = DisaggregatedExecutor(
        models, pools[0], buffers, weights_pool, token_buckets=config.token_buckets,
        max_batch=config.max_batch, micro_batches=config.micro_batches,
        micro_batch_min_tokens=config.micro_batch_min_tokens,
        attn_impl=config.attn_impl, moe_impl=config.moe_impl, fuse_experts=config.fuse_experts,
        timeline_every=config.timeline_every,
        fused_token_buckets=fused_buckets, decode_steps=config.decode_steps_per_dispatch)
    return Runtime(pools, model_pools, executor, weights_pool)

  def add_model(self, runtime: Runtime, config, model: LoadedModel, spec: KVModelSpec, *,
                log: Callable[[str], None]) -> None:
    pool, weights_pool = runtime.pools[0], runtime.weights_pool
    pool.register_model(spec, home_device=model.group)
    try:
      stripped = weights_pool.register(model.model_id, model.cfg, model.params,
                                       slots_per_device=config.expert_slots_per_device)
    except Exception:
      pool.unregister_model(model.model_id)
      raise
    model.params = jax.device_put(stripped, runtime.executor.kv_devices[model.group])
    try:
      runtime.executor.add_model(model, log=log)
    except Exception:
      weights_pool.unregister(model.model_id)
      pool.unregister_model(model.model_id)
      raise
    runtime.model_pools[model.model_id] = pool
