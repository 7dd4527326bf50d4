"""`shared` (kvcached-like): each device group's models allocate from one elastic KV pool.

Colocated: a model's whole parameters live on its group's device (`EngineConfig.devices[g]`),
its step runs there in one executable (`ColocatedExecutor`). The rest of the device's budget is
one KV pool the group's models share with no reservation; preemption takes the most recently
admitted request of any of them. Invariant: a model's KV pages are on its own group's device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from crosspool_jax.engine.executors.api import LoadedModel
from crosspool_jax.engine.executors.colocated import ColocatedExecutor
from crosspool_jax.engine.policies.base import Budget, FleetModel, MemoryPolicy, Plan, Runtime
from crosspool_jax.engine.policies.placement import KVLayout, lay_out_kv
from crosspool_jax.engine.policies.sizes import param_bytes
from crosspool_jax.pools.kv_buffers import allocate_kv_buffers
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool


class SharedPolicy(MemoryPolicy):
  """Whole weights next to one elastic KV pool per device group (the module docstring)."""

  name = "shared"
  kv_pool_policy = "shared"  # the `KVPool` policy of a group's pool

  def validate(self, config) -> None:
    if config.weight_devices:
      raise ValueError(f"a {self.name} engine has no weights devices, got weight_devices="
                       f"{tuple(config.weight_devices)}")

  # --- planning ---------------------------------------------------------------------------

  def _plan(self, fleet: Mapping[str, FleetModel], budget: Budget) -> Plan:
    kv = lay_out_kv({m: f.cfg for m, f in fleet.items()},
                    {m: param_bytes(f.cfg, f.dtype)["total"] for m, f in fleet.items()},
                    num_devices=budget.kv_devices, device_bytes=budget.device_bytes,
                    page_elems=budget.page_elems, page_bytes=budget.page_bytes,
                    reserve_fraction=budget.reserve_fraction, split=True,
                    tensor_parallel=budget.tensor_parallel)
    not_fit = dict(kv.not_fit)
    max_context, accounting = self._contexts(fleet, kv, not_fit)
    return Plan(self.name, dict(kv.placement.device), dict(kv.placement.tp),
                kv.pages_per_device, max_context, None, not_fit,
                kv.accounting | {"weight_devices": 0, "stranded_bytes_per_weights_device": []}
                | accounting)

  def _contexts(self, fleet: Mapping[str, FleetModel], kv: KVLayout, not_fit: dict[str, str]
                ) -> tuple[dict[str, int], dict]:
    """(context served per model: the fleet's, accounting to add); fills `not_fit`."""
    out = {}
    for m in kv.page_tokens:
      if m in not_fit:
        continue
      layers = fleet[m].cfg.num_layers
      if kv.pages_per_device - 1 < layers:
        not_fit[m] = (f"{self.name}: {kv.pages_per_device - 1} pages cannot give one token a "
                      f"page in each of {layers} layers")
        continue
      out[m] = fleet[m].max_context
    return out, {}

  def request_pages(self, plan: Plan, model_id: str) -> int:
    return plan.pages_per_device - 1

  # --- pools and engine -------------------------------------------------------------------

  def _pool(self, page_elems: int, pages_per_device: int) -> KVPool:
    return KVPool(page_elems=page_elems, pages_per_device=pages_per_device,
                  policy=self.kv_pool_policy)

  def kv_pools(self, specs, groups, *, page_elems, pages_per_device, kv_devices):
    del kv_devices  # one pool per group, each on the group's device
    pools: dict[int, KVPool] = {}
    for g in sorted(set(groups.values())):
      pools[g] = self._pool(page_elems, pages_per_device)
      for m, spec in specs.items():
        if groups[m] == g:
          pools[g].register_model(spec)
    return pools, {m: pools[groups[m]] for m in specs}

  def start(self, config, models: dict[str, LoadedModel], specs: dict[str, KVModelSpec]
            ) -> Runtime:
    pools, model_pools = self.kv_pools(
        specs, {m: model.group for m, model in models.items()}, page_elems=config.page_elems,
        pages_per_device=config.pages_per_device, kv_devices=len(config.devices))
    buffers = {g: allocate_kv_buffers(p, [jax.devices()[config.devices[g]]],
                                      dtype=jnp.dtype(config.kv_dtype))[0]
               for g, p in pools.items()}
    executor = ColocatedExecutor(models, model_pools, buffers,
                                 token_buckets=config.token_buckets, max_batch=config.max_batch,
                                 attn_impl=config.attn_impl, moe_impl=config.moe_impl,
                                 decode_steps=config.decode_steps_per_dispatch,
                                 timeline_every=config.timeline_every)
    return Runtime(pools, model_pools, executor)

  def add_model(self, runtime: Runtime, config, model: LoadedModel, spec: KVModelSpec, *,
                log: Callable[[str], None]) -> None:
    pool, buffer = runtime.pools.get(model.group), None
    if pool is None:
      pool = self._pool(config.page_elems, config.pages_per_device)
    pool.register_model(spec)
    try:
      if model.group not in runtime.pools:
        buffer = allocate_kv_buffers(pool, [jax.devices()[config.devices[model.group]]],
                                     dtype=jnp.dtype(config.kv_dtype))[0]
      runtime.executor.add_model(model, pool, buffer, log=log)
    except Exception:
      pool.unregister_model(model.model_id)
      raise
    runtime.pools[model.group] = pool
    runtime.model_pools[model.model_id] = pool
