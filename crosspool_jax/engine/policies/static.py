"""`static`: as `shared`, but each model reserves max_batch x max_context pages of its group.

The planned context cap: on a group of m models, each gets an equal share of the pool's usable
pages for `max_batch` requests of its full context, so it serves at most share / (layers x
max_batch) pages of tokens. Invariant: a model never holds more than its reservation, and the
reservations of a group never exceed its pool (registration fails otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from crosspool_jax.engine.policies.base import FleetModel, Plan
from crosspool_jax.engine.policies.placement import KVLayout, page_tokens
from crosspool_jax.engine.policies.shared import SharedPolicy


class StaticPolicy(SharedPolicy):
  """Per-model KV reservations on colocated device groups (the module docstring)."""

  name = "static"
  kv_pool_policy = "static"

  def _contexts(self, fleet: Mapping[str, FleetModel], kv: KVLayout, not_fit: dict[str, str]
                ) -> tuple[dict[str, int], dict]:
    members: dict[int, list[str]] = {}
    for m in kv.page_tokens:
      if m not in not_fit:
        members.setdefault(kv.placement.device[m], []).append(m)
    out, shares = {}, {}
    for group in members.values():
      share = (kv.pages_per_device - 1) // len(group)
      for m in group:
        f = fleet[m]
        shares[m] = share
        cap = share // (f.cfg.num_layers * f.max_batch) * kv.page_tokens[m]
        if cap < 1:
          not_fit[m] = (f"{self.name}: its share of {share} pages cannot give each of max_batch="
                        f"{f.max_batch} requests one page in each of {f.cfg.num_layers} layers")
          continue
        out[m] = min(f.max_context, cap)
    return out, {"kv_share_pages": shares}

  def request_pages(self, plan: Plan, model_id: str) -> int:
    return plan.accounting["kv_share_pages"][model_id]

  def model_pages(self, plan: Plan, fleet: Mapping[str, FleetModel], model_id: str
                  ) -> tuple[int, int | None]:
    """Its reservation: max_batch requests of its served context."""
    f, page_elems = fleet[model_id], plan.accounting["page_elems"]
    pt = page_tokens(f.cfg, page_elems, plan.tp[model_id])
    per_request = math.ceil(plan.max_context[model_id] / pt)
    return f.cfg.num_layers * f.max_batch * per_request, f.max_batch
