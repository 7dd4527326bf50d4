"""The KV planner of the weights-pool policies: the split of D devices with the most KV pages.

`best_split` plans the fleet with every W of 1..D-1 weights devices (the rest hold KV; the
policy's plan at that split gives each weights device as many expert slots as it holds, so it
strands less than one slot) and keeps the feasible plan (every model fits, one layer's experts
fit its partition at once) with the most usable KV pages; ties go to fewer weights devices.
Why pages: a weights-pool plan puts every KV page in one pool, and each model's KV tokens (one
request's raw context, its requests alone, the whole fleet's fill) grow with the pool's usable
pages, so the most pages is the most tokens of every model at once. Weights devices hold no KV
pages (the executor runs attention on KV devices only); KV devices keep equal buffers
(`placement.lay_out_kv`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from crosspool_jax.engine.policies.base import Budget, Plan


def usable_kv_pages(plan: Plan) -> int:
  """KV pages of one pool over every KV device of `plan`, null pages excluded."""
  return plan.accounting["kv_devices"] * (plan.pages_per_device - 1)


def best_split(plan_at: Callable[[Budget], Plan], budget: Budget) -> Plan:
  """The plan with the most usable KV pages over every split of the budget's devices.

  Args:
    plan_at: the policy's plan at the split of a budget (its kv_devices, weight_devices).
    budget: kv_devices + weight_devices are the devices to split.

  Returns:
    The best feasible plan, its accounting with `kv_planner` ({"usable_kv_pages": str(W) ->
    pages, None where infeasible}); if no split is feasible, the plan of the split with the fewest
    models that do not fit, each reason saying so.
  Raises:
    ValueError: fewer than 2 devices (one for weights, one for KV).
  """
  devices = budget.kv_devices + budget.weight_devices
  if devices < 2:
    raise ValueError(f"budget: the KV planner needs at least 2 devices (weights + KV), got "
                     f"{devices}")
  plans = {w: plan_at(dataclasses.replace(budget, kv_devices=devices - w, weight_devices=w))
           for w in range(1, devices)}
  pages = {w: None if p.not_fit else usable_kv_pages(p) for w, p in plans.items()}
  feasible = [w for w in plans if pages[w] is not None]
  if not feasible:
    w = min(plans, key=lambda w: (len(plans[w].not_fit), w))
    why = {m: f"no split of {devices} devices serves it; with {w} weights device(s): {r}"
           for m, r in plans[w].not_fit.items()}
    return dataclasses.replace(plans[w], not_fit=why)
  w = max(feasible, key=lambda w: (pages[w], -w))
  return dataclasses.replace(plans[w], accounting=plans[w].accounting
                             | {"kv_planner": {"usable_kv_pages": {str(k): v
                                                                   for k, v in pages.items()}}})
