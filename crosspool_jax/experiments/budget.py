"""One memory budget, three memory organisations: the engine settings each policy gets.

Every policy of an experiment runs on the same devices with the same bytes per device. This
module turns (fleet, per-device bytes, policy's devices) into what the engine is given —
placement of the models, KV pages per device, the `static` context cap and the CrossPool
expert slots — with the same rules as `crosspool_jax.pools.capacity` (there for paper-scale
fleets, here for the fleet the engine really serves):

  * `static` and `shared`: the models are dealt round robin over the KV groups (one device
    each, fleet order). A device holds its models' whole parameters; the rest of its budget
    is KV pages. The engine gives every group the same number of pages, so the most loaded
    device sets it (the excess elsewhere is reported as stranded).
  * `static` additionally reserves, for each of a group's m models, an equal share of the pages
    for max_batch requests of its full context: the context the budget allows is
    share / (layers x max_batch) pages, so the served `max_context` is capped there.
  * `crosspool`: each model has a home KV device (round robin) holding its non-expert
    parameters (attention, embeddings, routers, shared experts, dense MLPs); KV pages fill the
    rest (equal on every KV device: the most loaded sets it). Every weights device holds
    `expert_slots_per_device` slots of every shape class, as many as its budget allows and no
    more than the class's experts; fewer slots than experts means swapping.

The budget is accounting: on CPU, devices have no real limit, so the numbers are what the
organisation would fit on devices of `device_bytes`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.pools.capacity import dtype_itemsize, param_bytes
from crosspool_jax.pools.kv_pool import plan_pages_per_device
from crosspool_jax.pools.weights_pool import ExpertModelSpec
from pallas_kernels.ragged_paged_attention import page_tokens_of

COLOCATED = ("static", "shared")


@dataclasses.dataclass(frozen=True)
class FleetModel:
  """What the budget needs of one model: config, param dtype, batch and context served."""

  cfg: ModelConfig
  dtype: str
  max_batch: int
  max_context: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """The engine settings of one policy under the budget, and the accounting behind them.

  Attributes:
    policy: "static", "shared" or "crosspool".
    groups: model id -> KV group (colocated) or home KV device index (crosspool).
    pages_per_device: KV pages of each KV device, the null page included.
    max_context: model id -> context served (the `static` cap; the fleet's otherwise).
    expert_slots_per_device: crosspool: slots per shape class per weights device (else None).
    accounting: bytes per device (resident weights, KV, stranded), KV tokens per model, the
      resident expert fraction: what the results file reports.
  """

  policy: str
  groups: dict[str, int]
  pages_per_device: int
  max_context: dict[str, int]
  expert_slots_per_device: int | None
  accounting: dict


def _page_tokens(cfg: ModelConfig, page_elems: int) -> int:
  try:
    return page_tokens_of(page_elems, cfg.num_kv_heads, cfg.head_dim)
  except ValueError as e:
    raise ValueError(f"page_elems={page_elems} is not a multiple of 2 x kv_heads x head_dim = "
                     f"{2 * cfg.num_kv_heads * cfg.head_dim} of a {cfg.family} model") from e


def _pages(device_bytes: int, resident: int, page_bytes: int, reserve_fraction: float,
           what: str) -> int:
  try:
    return plan_pages_per_device(device_bytes=device_bytes, resident_bytes=resident,
                                 page_bytes=page_bytes, reserve_fraction=reserve_fraction)
  except ValueError as e:
    raise ValueError(f"budget: {what}: {e}") from e


def plan_policy(fleet: Mapping[str, FleetModel], *, policy: str, kv_devices: int,
                weight_devices: int = 0, device_bytes: int, page_elems: int, kv_dtype: str,
                reserve_fraction: float = 0.0, weights_device_bytes: int | None = None) -> Plan:
  """The engine settings of `policy` for `fleet` on devices of `device_bytes` each.

  Args:
    fleet: model id -> FleetModel, in fleet order.
    policy: "static", "shared" or "crosspool".
    kv_devices: KV groups (colocated) or KV-pool devices (crosspool).
    weight_devices: crosspool: weights-pool devices.
    device_bytes: memory budget of every device.
    page_elems, kv_dtype: the KV page (its bytes are the same for every policy).
    reserve_fraction: kept free on every device (activations, compiler scratch).
    weights_device_bytes: crosspool: budget of a weights device, if not `device_bytes` (an
      ablation that needs more room for experts says so).

  Raises:
    ValueError: the budget cannot hold the fleet under `policy` (which device, how short).
  """
  if kv_devices < 1:
    raise ValueError(f"budget: {policy} needs at least one KV device, got {kv_devices}")
  models = list(fleet)
  page_bytes = page_elems * dtype_itemsize(kv_dtype)
  groups = {m: i % kv_devices for i, m in enumerate(models)}
  weights = {m: param_bytes(f.cfg, f.dtype) for m, f in fleet.items()}
  key = "total" if policy in COLOCATED else "non_expert"
  resident = [sum(weights[m][key] for m in models if groups[m] == d) for d in range(kv_devices)]
  pages = min(_pages(device_bytes, r, page_bytes, reserve_fraction, f"KV device {d}")
              for d, r in enumerate(resident))
  usable = device_bytes * (1 - reserve_fraction)
  max_context = {m: f.max_context for m, f in fleet.items()}
  accounting = {"device_bytes": device_bytes, "page_bytes": page_bytes,
                "kv_devices": kv_devices, "weight_devices": weight_devices,
                "resident_bytes_per_kv_device": resident,
                "kv_bytes": kv_devices * (pages - 1) * page_bytes,
                "stranded_bytes": int(sum(usable - r - pages * page_bytes for r in resident))}
  slots = None
  if policy == "static":
    for d in range(kv_devices):
      members = [m for m in models if groups[m] == d]
      share = (pages - 1) // max(1, len(members))
      for m in members:
        f = fleet[m]
        pt = _page_tokens(f.cfg, page_elems)
        cap = share // (f.cfg.num_layers * f.max_batch) * pt
        if cap < 1:
          raise ValueError(f"budget: static: model {m!r} gets {share} pages on KV device {d}, "
                           f"fewer than one page per layer for max_batch={f.max_batch}")
        max_context[m] = min(f.max_context, cap)
  elif policy == "crosspool":
    if weight_devices < 1:
      raise ValueError("budget: crosspool needs at least one weights device")
    classes: dict = {}
    for m, f in fleet.items():
      spec = ExpertModelSpec.from_config(m, f.cfg, f.dtype)
      classes[spec.shape_class] = classes.get(spec.shape_class, 0) + spec.num_pooled_experts
    per_slot = sum(c.expert_bytes for c in classes)
    need = max(math.ceil(n / weight_devices) for n in classes.values())
    w_bytes = device_bytes if weights_device_bytes is None else weights_device_bytes
    w_usable = w_bytes * (1 - reserve_fraction)
    slots = min(int(w_usable // per_slot), need)
    top_k = max(f.cfg.top_k for f in fleet.values())
    if slots < top_k:
      raise ValueError(f"budget: crosspool: a weights device of {w_bytes} B holds "
                       f"{int(w_usable // per_slot)} slot(s) per shape class, fewer than top_k="
                       f"{top_k}")
    accounting |= {
        "weights_device_bytes": w_bytes,
        "expert_slots_per_device": slots,
        "expert_bytes_per_weights_device": slots * per_slot,
        "resident_expert_fraction": {str(c): min(1.0, slots * weight_devices / n)
                                     for c, n in classes.items()},
    }
  elif policy != "shared":
    raise ValueError(f"budget: unknown policy {policy!r}")
  # The most KV tokens one request of a model can hold (the whole pool it may draw from).
  reachable = {m: ((pages - 1) // sum(g == groups[m] for g in groups.values())
                   if policy == "static" else
                   (pages - 1) * (kv_devices if policy == "crosspool" else 1))
               for m in models}
  accounting["longest_context_budget"] = {
      m: min(max_context[m], reachable[m] // f.cfg.num_layers * _page_tokens(f.cfg, page_elems))
      for m, f in fleet.items()}
  return Plan(policy, groups, pages, max_context, slots, accounting)

