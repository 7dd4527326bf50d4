"""KV capacity of a fleet under each memory policy at one memory budget, probed on real pools.

`measure_capacity` takes each policy's own plan of the fleet on D devices of `device_bytes`
(`MemoryPolicy.plan`: the placement rule, equal KV buffers, static's cap, the weights pool's
slots), builds the host pools that policy runs with (`kv_pools`; its `WeightsPool`) and probes
them (`probes`): the longest context of one request, the KV tokens one model alone can reach,
the fleet's fill with every model active. The policy's closed form (`capacity`) is reported
next to each probe, and so are the bytes each device strands (the plan's accounting). Analysis
only: a colocated model whose weights need several devices is split over them (tensor
parallel, ceil(K / tp) KV heads per rank: `placement.heads_per_rank` has the closed form), and
`tensor_parallel` shards every colocated model over that many devices at least (the weights-pool
policies' KV is not sharded by heads); a weights-pool policy gets W devices (given; else,
with `kv_planner`, the KV planner's split (`engine/policies/planner.py`); else the smallest
whose plan serves every model with every expert resident, else a share proportional to expert
bytes), the other D - W hold KV. A model that does not fit is reported under `not_fit` with
the reason. Numpy only, no device call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from crosspool_jax.capacity import probes
from crosspool_jax.engine.policies import (
  POLICIES,
  Budget,
  FleetModel,
  MemoryPolicy,
  Plan,
  get_policy,
)
from crosspool_jax.engine.policies.placement import heads_per_rank, page_tokens, usable_bytes
from crosspool_jax.engine.policies.sizes import dtype_itemsize, kv_bytes_per_token, param_bytes
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.pools.kv_pool import KVModelSpec
from crosspool_jax.pools.weights_pool import ExpertModelSpec, PoolExhaustedError

ORGANISATIONS = tuple(POLICIES)


@dataclasses.dataclass(frozen=True)
class _Settings:
  num_devices: int
  device_bytes: int
  page_elems: int
  page_bytes: int
  dtype: str
  reserve_fraction: float
  kv_planner: bool
  tensor_parallel: int

  def budget(self, weight_devices: int) -> Budget:
    return Budget(device_bytes=self.device_bytes, page_elems=self.page_elems,
                  kv_dtype=self.dtype, kv_devices=self.num_devices - weight_devices,
                  weight_devices=weight_devices, reserve_fraction=self.reserve_fraction,
                  kv_planner=self.kv_planner, tensor_parallel=self.tensor_parallel)


def _weight_devices(policy: MemoryPolicy, fleet: Mapping[str, FleetModel], s: _Settings,
                    given: int | None) -> tuple[int, str]:
  """W and the rule that chose it (the module docstring)."""
  d = s.num_devices
  if given is not None:
    if s.kv_planner:
      raise ValueError(f"crosspool_weight_devices={given} and kv_planner: the planner chooses "
                       "W, give one or the other")
    if not 1 <= given <= d - 1:
      raise ValueError(f"crosspool_weight_devices must be in [1, {d - 1}], got {given}")
    return given, "given"
  if s.kv_planner:
    return policy.plan(fleet, s.budget(1)).accounting["weight_devices"], "kv planner"
  for w in range(1, d):
    plan = policy.plan(fleet, s.budget(w))
    if not plan.not_fit and (plan.accounting["resident_experts"]
                             == plan.accounting["pooled_experts"]):
      return w, "smallest holding all experts"
  sizes = [param_bytes(f.cfg, f.dtype) for f in fleet.values()]
  expert = sum(b["routed_experts"] for b in sizes)
  total = sum(b["total"] for b in sizes)
  return (min(d - 1, max(1, round(d * expert / max(1, total)))),
          "experts do not fit on d-1 devices: share proportional to expert bytes")


def _weights_record(policy: MemoryPolicy, fleet: Mapping[str, FleetModel], plan: Plan,
                    s: _Settings, w: int, rule: str) -> dict[str, Any]:
  """The policy's weights pool with the plan's slots, pinned layer by layer until each
  partition is full: the experts resident, measured."""
  out: dict[str, Any] = {"devices": list(range(w)), "rule": rule,
                         "free_bytes_per_device": s.device_bytes}
  if plan.expert_slots_per_device is None:
    return out
  pool = policy.new_weights_pool(device_bytes=int(usable_bytes(s.device_bytes,
                                                               s.reserve_fraction)),
                                 num_devices=w, expert_policy="lru")
  specs = [ExpertModelSpec.from_config(m, fleet[m].cfg, fleet[m].dtype) for m in plan.max_context]
  for spec in specs:
    pool.register_model(spec, slots_per_device=plan.expert_slots_per_device)
  for spec in specs:
    for layer in spec.moe_layers:
      try:
        pool.pin(spec.model_id, layer, range(spec.num_experts))
      except PoolExhaustedError:  # the partition is nearly full: expert by expert
        for e in range(spec.num_experts):
          try:
            pool.pin(spec.model_id, layer, [e])
          except PoolExhaustedError:
            break
  pool.check_invariants()
  a = plan.accounting
  resident = len(pool.resident_keys())
  return out | {
      "slots_per_device": plan.expert_slots_per_device, "classes": len(pool.classes),
      "experts": a["pooled_experts"], "resident_experts": resident,
      "resident_fraction": resident / a["pooled_experts"] if a["pooled_experts"] else 1.0,
      "resident_experts_closed_form": a["resident_experts"],
      "slot_bytes_per_device": a["expert_bytes_per_weights_device"],
      "all_resident": resident == a["pooled_experts"],
      "free_bytes_per_device": int(s.device_bytes - a["expert_bytes_per_weights_device"])}


def _placement(plan: Plan, first_kv_device: int) -> list[dict[str, Any]]:
  """The plan's KV groups: devices, models, resident bytes and usable KV pages of each."""
  by_device: dict[int, list[str]] = {}
  for m, d in plan.groups.items():
    by_device.setdefault(d, []).append(m)
  resident = plan.accounting["resident_bytes_per_kv_device"]
  return [{"devices": [first_kv_device + d + i for i in range(plan.tp[ms[0]])],
           "tp": plan.tp[ms[0]], "models": ms, "weights_bytes_per_device": resident[d],
           "kv_pages": plan.pages_per_device - 1}
          for d, ms in sorted(by_device.items())]


def _measure(policy: MemoryPolicy, fleet: Mapping[str, FleetModel], s: _Settings,
             given_w: int | None) -> dict[str, Any]:
  """One organisation: its plan, its pools probed, its closed forms."""
  out: dict[str, Any] = {"models": {}, "fleet_fill": {}, "not_fit": {}, "placement": [],
                         "kv_pages": 0, "kv_bytes": 0, "fleet_fill_tokens": 0}
  w, rule = 0, ""
  if policy.pools_experts:
    if s.num_devices < 2:
      out["not_fit"] = dict.fromkeys(fleet, f"{policy.name} needs >= 2 devices (weights + KV)")
      return out
    w, rule = _weight_devices(policy, fleet, s, given_w)
  budget = s.budget(w)
  plan = policy.plan(fleet, budget)
  a = plan.accounting
  out |= {"not_fit": dict(plan.not_fit), "placement": _placement(plan, w),
          "pages_per_device": plan.pages_per_device,
          "stranded_bytes": a["stranded_bytes"],
          "stranded_bytes_per_device": {"kv": a["stranded_bytes_per_kv_device"],
                                        "weights": a["stranded_bytes_per_weights_device"]}}
  if policy.pools_experts:
    out["weights_pool"] = _weights_record(policy, fleet, plan, s, w, rule)
  caps = plan.max_context
  if not caps:
    return out
  closed = policy.capacity(plan, fleet, s.page_elems)
  specs = {}
  for m, cap in caps.items():
    cfg, tp = fleet[m].cfg, plan.tp[m]
    pages, rows = policy.model_pages(plan, fleet, m)
    if rows is None:  # an elastic pool: enough rows to fill it, memory is what is measured
      rows = max(fleet[m].max_batch,
                 pages // (cfg.num_layers * math.ceil(cap / page_tokens(cfg, s.page_elems, tp)))
                 + 1)
    specs[m] = KVModelSpec(m, cfg.num_layers, heads_per_rank(cfg, tp), cfg.head_dim, cap, rows,
                           stores=cfg.kv_stores)

  def pool_of(m: str, spec: KVModelSpec | None = None):
    """A fresh pool of `m` with every served model registered (or `spec` alone)."""
    chosen = specs if spec is None else {m: spec}
    _, model_pools = policy.kv_pools(chosen, {k: plan.groups[k] for k in chosen},
                                     page_elems=s.page_elems,
                                     pages_per_device=plan.pages_per_device,
                                     kv_devices=budget.kv_devices)
    return model_pools[m]

  pools, model_pools = policy.kv_pools(specs, {m: plan.groups[m] for m in specs},
                                       page_elems=s.page_elems,
                                       pages_per_device=plan.pages_per_device,
                                       kv_devices=budget.kv_devices)
  for pool in pools.values():
    out["fleet_fill"] |= probes.fill(pool, [m for m in caps if model_pools[m] is pool], caps)
  total = sum(p.capacity for p in pools.values())
  for m, cap in caps.items():
    cfg = fleet[m].cfg
    raw_cap = max(closed[m]["longest_context_raw"], 1)
    raw_pool = pool_of(m, dataclasses.replace(specs[m], max_context=raw_cap, max_batch=1))
    rec = {"page_tokens": page_tokens(cfg, s.page_elems, plan.tp[m]), "tp": plan.tp[m],
           "pool_pages": model_pools[m].capacity,
           "longest_context": probes.longest(pool_of(m), m, cap), "longest_context_cap": cap,
           "longest_context_raw": probes.longest(raw_pool, m, raw_cap),
           "kv_tokens_reachable": probes.fill(pool_of(m), [m], caps)[m],
           "kv_tokens_equiv": total // cfg.num_layers * page_tokens(cfg, s.page_elems,
                                                                   plan.tp[m]),
           "closed_form": closed[m]}
    rec["closed_form_agrees"] = all(rec[k] == v for k, v in closed[m].items())
    out["models"][m] = rec
  return out | {"kv_pages": total, "kv_bytes": a["kv_bytes"],
                "fleet_fill_tokens": sum(out["fleet_fill"].values())}


def measure_capacity(fleet: Sequence[ModelConfig] | Mapping[str, ModelConfig], *,
                     num_devices: int, device_bytes: int, page_bytes: int, dtype: str,
                     max_batch: int, crosspool_weight_devices: int | None = None,
                     kv_planner: bool = False, reserve_fraction: float = 0.0,
                     tensor_parallel: int = 1,
                     organisations: Sequence[str] = ORGANISATIONS) -> dict[str, Any]:
  """KV capacity of `fleet` under each memory policy, probed on the real host pools.

  Args:
    fleet: model configs (ids "m<i>-<family>") or {model id: config}.
    num_devices: D devices, each of `device_bytes` (the equal budget: D x device_bytes).
    page_bytes: one KV page (one layer's K and V of page_tokens tokens), every policy.
    dtype: dtype name of weights and KV.
    max_batch: concurrent requests per model (what `static` reserves for).
    crosspool_weight_devices: W of the weights-pool policies; default: the module's rule.
    kv_planner: the weights-pool policies' KV planner chooses W and fills every weights device
      with expert slots (`Budget.kv_planner`).
    reserve_fraction: fraction of each device kept for activations / workspace.
    tensor_parallel: the colocated policies' degree t (`Budget.tensor_parallel`): every model
      sharded over t devices, ceil(K / t) KV heads per rank.
    organisations: which policies (names of `engine.policies.POLICIES`) to measure.

  Returns:
    {"settings", "models": per model bytes, "organisations": {name: {"kv_pages" (the pools'
    usable pages; under tensor parallelism one page stands for one on each rank), "kv_bytes"
    (every KV buffer's usable pages, each rank's counted),
    "models": {id: {"longest_context" (probed, capped), "longest_context_cap",
    "longest_context_raw" (one request, no context cap), "kv_tokens_reachable" (probed: only
    this model active), "kv_tokens_equiv" (all the organisation's KV pages in this model's
    tokens), "closed_form", "closed_form_agrees", ...}}, "fleet_fill" (tokens per model with
    every model active at once), "fleet_fill_tokens", "placement", "pages_per_device",
    "stranded_bytes" (all devices), "stranded_bytes_per_device" ({"kv": per KV device,
    "weights": per weights device}), "weights_pool" (weights-pool policies), "not_fit": {id:
    reason}}}.

  Raises:
    ValueError: settings that no policy could use (sizes <= 0, a page that is not a whole
      number of elements, an unknown organisation, a W outside [1, D-1], a W given with
      kv_planner, a tensor_parallel degree that does not divide D or shard a model's heads).
  """
  if isinstance(fleet, Mapping):
    cfgs = dict(fleet)
  else:
    cfgs = {f"m{i}-{c.family}": c for i, c in enumerate(fleet)}
  if not cfgs:
    raise ValueError("the fleet is empty")
  for name, v in (("num_devices", num_devices), ("device_bytes", device_bytes),
                  ("page_bytes", page_bytes), ("max_batch", max_batch)):
    if v <= 0:
      raise ValueError(f"{name} must be > 0, got {v}")
  bad = set(organisations) - set(ORGANISATIONS)
  if bad:
    raise ValueError(f"unknown organisations {sorted(bad)}; have {ORGANISATIONS}")
  size = dtype_itemsize(dtype)
  if page_bytes % size:
    raise ValueError(f"page_bytes {page_bytes} is not a multiple of the {dtype} itemsize {size}")
  s = _Settings(num_devices, device_bytes, page_bytes // size, page_bytes, dtype,
                reserve_fraction, kv_planner, tensor_parallel)
  models = {m: FleetModel(c, dtype, max_batch, c.max_context) for m, c in cfgs.items()}
  return {
      "settings": {"num_devices": num_devices, "device_bytes": device_bytes,
                   "budget_bytes": num_devices * device_bytes, "page_bytes": page_bytes,
                   "page_elems": s.page_elems, "dtype": dtype, "max_batch": max_batch,
                   "reserve_fraction": reserve_fraction,
                   "crosspool_weight_devices": crosspool_weight_devices,
                   "kv_planner": kv_planner, "tensor_parallel": tensor_parallel},
      "models": {m: {"config": dataclasses.asdict(c) | {"moe_layers": sum(c.moe_layers)},
                     "param_bytes": param_bytes(c, dtype),
                     "kv_bytes_per_token": kv_bytes_per_token(c, dtype)}
                 for m, c in cfgs.items()},
      "organisations": {org: _measure(get_policy(org), models, s, crosspool_weight_devices)
                        for org in organisations},
  }


def format_table(result: Mapping[str, Any]) -> str:
  """A fixed-width table of a `measure_capacity` result: one row per (organisation, model);
  `strand GiB`: the bytes the organisation's plan strands on all its devices."""
  gib = 1 << 30
  width = max(10, *(len(org) for org in result["organisations"]))
  head = (f"{'org':<{width}} {'W':>2} {'KV GiB':>8} {'strand GiB':>10}  {'model':<24} "
          f"{'longest':>9} {'(raw)':>10} {'reachable':>10} {'fleet fill':>10} {'cf ok':>5}")
  lines = [head, "-" * len(head)]
  for org, res in result["organisations"].items():
    wp = res.get("weights_pool")
    w = str(len(wp["devices"])) if wp else "-"
    lead = (f"{org:<{width}} {w:>2} {res['kv_bytes'] / gib:>8.1f} "
            f"{res.get('stranded_bytes', 0) / gib:>10.2f}  ")
    for m, rec in res["models"].items():
      lines.append(f"{lead}{m:<24} "
                   f"{rec['longest_context']:>9} {rec['longest_context_raw']:>10} "
                   f"{rec['kv_tokens_reachable']:>10} {res['fleet_fill'].get(m, 0):>10} "
                   f"{'yes' if rec['closed_form_agrees'] else 'NO':>5}")
    for m, why in res["not_fit"].items():
      lines.append(f"{lead}{m:<24} does not fit: {why}")
    extra = [f"fleet fill total {res['fleet_fill_tokens']} tokens"]
    if "stranded_bytes_per_device" in res:
      extra.append("most stranded on a device: " + ", ".join(
          f"{max(b) / gib:.2f} GiB ({kind})"
          for kind, b in res["stranded_bytes_per_device"].items() if b))
    if wp:
      extra.append(f"experts resident {wp.get('resident_fraction', 0):.3f} ({wp['rule']}), "
                   f"{wp['free_bytes_per_device'] / gib:.1f} GiB free per weights device")
    lines.append(f"{org:<{width}}    " + "; ".join(extra))
  return "\n".join(lines)


def format_totals(results: Sequence[Mapping[str, Any]]) -> str:
  """One row per (result, organisation) of several `measure_capacity` results (a sweep of
  `tensor_parallel`): the fleet's KV tokens with every model active, and the longest context
  one request of its first served model reaches (no context cap)."""
  gib = 1 << 30
  head = (f"{'t':>2} {'org':<21} {'KV GiB':>8} {'fleet fill':>11} {'longest (raw)':>13}")
  lines = [head, "-" * len(head)]
  for result in results:
    t = result["settings"]["tensor_parallel"]
    for org, res in result["organisations"].items():
      first = next(iter(res["models"].values()), None)
      longest = first["longest_context_raw"] if first else 0
      lines.append(f"{t:>2} {org:<21} {res['kv_bytes'] / gib:>8.1f} "
                   f"{res['fleet_fill_tokens']:>11} {longest:>13}")
  return "\n".join(lines)
