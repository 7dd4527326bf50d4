"""Memory policies of the engine, resolved by name (`EngineConfig.kv_policy`).

`POLICIES` is the registry (its order is the order runs are served and reported in: the
baselines first); `get_policy(name)` returns the policy object. Adding one: a module with a
`MemoryPolicy` subclass and its entry here (WORKSPACE.md, "How to add a memory policy").
"""

from __future__ import annotations

from crosspool_jax.engine.policies.base import Budget, FleetModel, MemoryPolicy, Plan, Runtime
from crosspool_jax.engine.policies.crosspool import CrossPoolPolicy
from crosspool_jax.engine.policies.crosspool_partitioned import PartitionedCrossPoolPolicy
from crosspool_jax.engine.policies.shared import SharedPolicy
from crosspool_jax.engine.policies.static import StaticPolicy

POLICIES: dict[str, type[MemoryPolicy]] = {
    cls.name: cls
    for cls in (StaticPolicy, SharedPolicy, CrossPoolPolicy, PartitionedCrossPoolPolicy)}


def get_policy(name: str) -> MemoryPolicy:
  """The memory policy registered as `name`."""
  if name not in POLICIES:
    raise ValueError(f"kv_policy must be one of {tuple(POLICIES)}, got {name!r}")
  return POLICIES[name]()


__all__ = ["POLICIES", "Budget", "FleetModel", "MemoryPolicy", "Plan", "Runtime", "get_policy"]
