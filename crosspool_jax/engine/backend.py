"""Where an engine's models and runtime live: on the devices (`DeviceBackend`, the default) or
host side only (the simulator's backend in `crosspool_jax.sim`).

A backend places a registered model's params and builds, from the engine's memory policy, the
`Runtime` (pools and executor) the engine serves with. Invariant: scheduling, admission and
preemption stay the engine's and the pools' whatever the backend, so a host-only runtime
schedules exactly as the device one does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import jax

from crosspool_jax.engine.executors.api import LoadedModel
from crosspool_jax.engine.policies import MemoryPolicy, Runtime
from crosspool_jax.pools.kv_pool import KVModelSpec

if TYPE_CHECKING:
  from crosspool_jax.engine.engine import EngineConfig


class Backend(Protocol):
  """What an `Engine` asks of where it runs."""

  def place(self, config: EngineConfig, params: dict, group: int) -> dict:
    """The params of a model registered in KV group `group`, where its executor reads them."""

  def start(self, policy: MemoryPolicy, config: EngineConfig, models: dict[str, LoadedModel],
            specs: dict[str, KVModelSpec]) -> Runtime:
    """The pools and the executor (not yet compiled) for `models`."""

  def add_model(self, policy: MemoryPolicy, runtime: Runtime, config: EngineConfig,
                model: LoadedModel, spec: KVModelSpec, *, log: Callable[[str], None]) -> None:
    """Joins a model to a started runtime; on any error `runtime` is left as it was."""


class DeviceBackend:
  """Params on their group's device; pools, buffers and executor from the policy."""

  def place(self, config, params: dict, group: int) -> dict:
    return jax.device_put(params, jax.devices()[config.devices[group]])

  def start(self, policy, config, models, specs) -> Runtime:
    return policy.start(config, models, specs)

  def add_model(self, policy, runtime, config, model, spec, *, log) -> None:
    policy.add_model(runtime, config, model, spec, log=log)
