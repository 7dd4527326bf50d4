"""The memory-policy interface: how one engine organises device memory, as one object.

A `MemoryPolicy` (`EngineConfig.kv_policy` names it) validates an engine config, plans a fleet
on a per-device byte budget (`plan`: placement, KV pages per device, context caps, expert
slots), builds the KV pools (`kv_pools`) and everything an `Engine` serves with (`start`,
`add_model` for a model registered while running), and states in closed form what its pools
hold (`capacity`, the cross-check of the capacity analysis). Invariant: the engine, the
experiment budget and the capacity analysis take these decisions from the policy object only;
none of them branches on a policy's name.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

from crosspool_jax.engine.executors.api import LoadedModel
from crosspool_jax.engine.executors.colocated import ColocatedExecutor
from crosspool_jax.engine.policies.placement import fill_closed_form, page_tokens
from crosspool_jax.engine.policies.sizes import dtype_itemsize
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool

if TYPE_CHECKING:
  from crosspool_jax.engine.engine import EngineConfig
  from crosspool_jax.engine.executors.crosspool import DisaggregatedExecutor


@dataclasses.dataclass(frozen=True)
class FleetModel:
  """What a plan needs of one model: config, param dtype, batch and context served."""

  cfg: ModelConfig
  dtype: str
  max_batch: int
  max_context: int


@dataclasses.dataclass(frozen=True)
class Budget:
  """The same bytes on every device, for every policy.

  Attributes:
    device_bytes: memory of every device.
    page_elems: elements of a KV page (its bytes are the same for every policy).
    kv_dtype: dtype of the KV pages.
    kv_devices: devices holding KV (all of them for a colocated policy).
    weight_devices: weights-pool devices (policies that pool the routed experts).
    reserve_fraction: kept free on every device (activations, compiler scratch).
    weights_device_bytes: memory of a weights device, if not `device_bytes`.
    kv_planner: weights-pool policies choose the split of the kv_devices + weight_devices
      devices themselves (`planner.best_split`: the most KV pages, expert slots filling every
      weights device) instead of taking it as given; colocated policies ignore it.
    tensor_parallel: colocated policies shard every model over this many devices at least
      (`placement.place`; the engine serves 1 only, `Plan.check_servable`), each rank caching
      ceil(K / t) of its KV heads (`placement.heads_per_rank`); weights-pool policies ignore
      it: their KV pool splits a sequence by pages over KV devices of its own, not by heads.
  """

  device_bytes: int
  page_elems: int
  kv_dtype: str
  kv_devices: int
  weight_devices: int = 0
  reserve_fraction: float = 0.0
  weights_device_bytes: int | None = None
  kv_planner: bool = False
  tensor_parallel: int = 1

  def __post_init__(self):
    if self.device_bytes <= 0 or self.page_elems <= 0:
      raise ValueError(f"budget: device_bytes and page_elems must be > 0, got "
                       f"{self.device_bytes}, {self.page_elems}")
    if self.tensor_parallel < 1:
      raise ValueError(f"budget: tensor_parallel must be >= 1, got {self.tensor_parallel}")
    if self.kv_devices < 1:
      raise ValueError(f"budget: at least one KV device is needed, got {self.kv_devices}")

  @property
  def page_bytes(self) -> int:
    return self.page_elems * dtype_itemsize(self.kv_dtype)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A policy's decisions for a fleet under a budget, and the accounting behind them.

  Attributes:
    policy: the policy's name.
    groups: model -> KV device index (its group under a colocated policy, its home KV device
      under a weights-pool policy; the first of its devices when split).
    tp: model -> devices its resident weights are split over (tensor parallel, colocated
      policies only: the capacity analysis plans it, the engine serves 1 only).
    pages_per_device: KV pages of every KV buffer, the null page included.
    max_context: model -> context served (a cap where the policy reserves, else the fleet's).
    expert_slots_per_device: slots per shape class per weights device (None: no weights pool).
    not_fit: model -> why the budget cannot hold it (the other fields leave it out).
    accounting: bytes per device, stranded bytes (per KV device, per weights device, in all:
      what a device may hold that is neither weights, a KV buffer nor an expert slot),
      resident expert fractions, longest context by the closed form: what the results file
      reports.
  """

  policy: str
  groups: dict[str, int]
  tp: dict[str, int]
  pages_per_device: int
  max_context: dict[str, int]
  expert_slots_per_device: int | None
  not_fit: dict[str, str]
  accounting: dict

  def check_servable(self) -> None:
    """Raises ValueError naming the first model the engine cannot serve under this plan."""
    if self.not_fit:
      m, why = next(iter(self.not_fit.items()))
      raise ValueError(f"budget: {self.policy}: model {m!r} does not fit: {why}")
    split = {m: tp for m, tp in self.tp.items() if tp > 1}
    if split:
      m, tp = next(iter(split.items()))
      raise ValueError(f"budget: {self.policy}: model {m!r} needs its weights split over {tp} "
                       "devices (tensor parallel), which the engine does not serve")


@dataclasses.dataclass
class Runtime:
  """What a started engine serves with, built by its policy (`start`, `add_model`).

  Attributes:
    pools: the KV pools by KV group (a weights-pool policy has one, under 0).
    model_pools: each model's KV pool.
    executor: runs the model batches.
    weights_pool: the device weights pool (None: no weights pool).
  """

  pools: dict[int, KVPool]
  model_pools: dict[str, KVPool]
  executor: ColocatedExecutor | DisaggregatedExecutor
  weights_pool: DeviceWeightsPool | None = None


class MemoryPolicy(abc.ABC):
  """One memory organisation of the engine (see the module docstring).

  Class attributes:
    name: the registry name (`EngineConfig.kv_policy`).
    pools_experts: routed experts live in a weights pool on `EngineConfig.weight_devices`.
  """

  name: ClassVar[str]
  pools_experts: ClassVar[bool] = False

  @abc.abstractmethod
  def validate(self, config: EngineConfig) -> None:
    """Raises ValueError for engine settings this policy cannot run with."""

  def plan(self, fleet: Mapping[str, FleetModel], budget: Budget) -> Plan:
    """The placement, KV pages, contexts and expert slots of `fleet` under `budget`.

    A model the budget cannot hold goes to `Plan.not_fit` with the reason (never raised); the
    accounting gets each served model's longest context by the closed form (`capacity`).
    """
    plan = self._plan(fleet, budget)
    longest = {m: c["longest_context"]
               for m, c in self.capacity(plan, fleet, budget.page_elems).items()}
    return dataclasses.replace(plan, accounting=plan.accounting
                               | {"longest_context_budget": longest})

  @abc.abstractmethod
  def _plan(self, fleet: Mapping[str, FleetModel], budget: Budget) -> Plan:
    """`plan` without the closed-form contexts."""

  @abc.abstractmethod
  def kv_pools(self, specs: Mapping[str, KVModelSpec], groups: Mapping[str, int], *,
               page_elems: int, pages_per_device: int, kv_devices: int
               ) -> tuple[dict[int, KVPool], dict[str, KVPool]]:
    """Fresh host KV pools with `specs` registered (host only: the analysis probes them).

    Args:
      specs: the models, in registration order.
      groups: model -> KV device index (as `Plan.groups`).
      page_elems, pages_per_device: the page and the buffers.
      kv_devices: the KV devices.

    Returns:
      (the pools by KV group, each model's pool).
    Raises:
      ValueError: a model the pool refuses (`KVPool.register_model`).
    """

  @abc.abstractmethod
  def start(self, config: EngineConfig, models: dict[str, LoadedModel],
            specs: dict[str, KVModelSpec]) -> Runtime:
    """Creates the pools and buffers and the executor (not yet compiled) for `models`."""

  @abc.abstractmethod
  def add_model(self, runtime: Runtime, config: EngineConfig, model: LoadedModel,
                spec: KVModelSpec, *, log: Callable[[str], None]) -> None:
    """Joins a model to a started engine's pools and executor (compiling only its own work);
    on any error `runtime` is left as it was."""

  @abc.abstractmethod
  def request_pages(self, plan: Plan, model_id: str) -> int:
    """Usable KV pages one request of `model_id` could ever hold (all layers)."""

  def model_pages(self, plan: Plan, fleet: Mapping[str, FleetModel], model_id: str
                  ) -> tuple[int, int | None]:
    """(pages the requests of `model_id` alone can hold, at most how many of them: None = no
    limit but memory). Default: an elastic pool, one request could take all of it."""
    return self.request_pages(plan, model_id), None

  def capacity(self, plan: Plan, fleet: Mapping[str, FleetModel], page_elems: int
               ) -> dict[str, dict[str, int]]:
    """Closed form, per served model: `longest_context` (capped), `longest_context_raw` (one
    request, no cap) and `kv_tokens_reachable` (its requests alone, each up to the cap)."""
    out = {}
    for m, cap in plan.max_context.items():
      cfg = fleet[m].cfg
      pt = page_tokens(cfg, page_elems, plan.tp[m])
      raw = self.request_pages(plan, m) // cfg.num_layers * pt
      pages, rows = self.model_pages(plan, fleet, m)
      out[m] = {"longest_context": min(cap, raw), "longest_context_raw": raw,
                "kv_tokens_reachable": fill_closed_form(pages, cfg.num_layers, pt, cap, rows)}
    return out
