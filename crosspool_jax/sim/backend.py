"""A host-only engine backend: the policy's pools with no device buffer, any executor.

`HostBackend` is the seam the simulator serves through (`Engine(backend=...)`): it builds
the pools exactly as the policy's `start` does (`MemoryPolicy.kv_pools`, and for a policy
that pools experts `CrossPoolPolicy.serving_weights_pool` with every model registered), but
allocates nothing on a device and takes the executor from `make_executor` (a `SimExecutor`,
or a `FakeExecutor` in tests). Invariant: a host-only engine admits, preempts and evicts
exactly as a device engine of the same config (the same pools, the same scheduler).
"""

from __future__ import annotations

from collections.abc import Callable

from crosspool_jax.engine.executors.api import Executor, LoadedModel
from crosspool_jax.engine.executors.crosspool import DeviceSplit
from crosspool_jax.engine.policies import Runtime
from crosspool_jax.pools.kv_pool import KVPool
from crosspool_jax.pools.weights_pool import ExpertModelSpec, PoolStats, WeightsPool


class HostWeightsPool:
  """What an engine asks of its weights pool (`DeviceWeightsPool`'s), host side only."""

  def __init__(self, pool: WeightsPool):
    self.pool = pool

  def sync_stats(self) -> PoolStats:
    return self.pool.stats

  def unregister(self, model_id: str) -> None:
    self.pool.unregister_model(model_id)


class HostBackend:
  """An engine backend with no device (see the module docstring).

  Args:
    make_executor: (the engine's models, its config, the host weights pool or None, model id
      -> its KV pool) -> the executor.
    weight_dtype: the dtype of the models' routed experts (their shape class).
  """

  def __init__(self, make_executor: Callable[[dict[str, LoadedModel], object,
                                              WeightsPool | None, dict[str, KVPool]], Executor],
               *, weight_dtype: str = "bfloat16"):
    self.make_executor = make_executor
    self.weight_dtype = weight_dtype

  def place(self, config, params: dict, group: int) -> dict:
    return params  # nothing runs them

  def start(self, policy, config, models, specs) -> Runtime:
    pools, model_pools = policy.kv_pools(
        specs, {m: model.group for m, model in models.items()}, page_elems=config.page_elems,
        pages_per_device=config.pages_per_device, kv_devices=len(config.devices))
    weights = None
    if policy.pools_experts:
      DeviceSplit(config.devices, config.weight_devices).check()
      experts = [ExpertModelSpec.from_config(m, model.cfg, self.weight_dtype)
                 for m, model in models.items()]
      weights = policy.serving_weights_pool(config, experts)
      for spec in experts:
        weights.register_model(spec, slots_per_device=config.expert_slots_per_device)
    return Runtime(pools, model_pools, self.make_executor(models, config, weights, model_pools),
                   None if weights is None else HostWeightsPool(weights))

  def add_model(self, policy, runtime, config, model, spec, *, log) -> None:
    raise ValueError(f"model {model.model_id!r}: a host-only engine serves the models "
                     "registered before start()")
