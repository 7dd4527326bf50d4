"""One memory budget, every memory policy: the engine settings each policy's plan gives.

Every policy of an experiment runs on the same devices with the same bytes per device. This
module asks the policy for its plan of the fleet the engine really serves
(`MemoryPolicy.plan`: placement, KV pages per device, context caps, expert slots) and refuses
a plan the engine cannot serve (a model that does not fit, or one whose weights would need
tensor parallelism). The rules live with the policies (`crosspool_jax/engine/policies/`), the
same ones the capacity analysis plans paper-scale fleets with. The budget is accounting: on
CPU, devices have no real limit, so the numbers are what the organisation would fit on devices
of `device_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping

from crosspool_jax.engine.policies import Budget, FleetModel, Plan, get_policy


def device_bytes(budget: Mapping) -> int:
  """The bytes of every device of an experiment's `budget` block: `device_gib` GiB if it is
  set (> 0), else `device_bytes` (0: no budget, the engine's pages as given)."""
  gib = budget.get("device_gib") or 0
  return int(gib * 2**30) if gib > 0 else int(budget["device_bytes"])


def plan_policy(fleet: Mapping[str, FleetModel], *, policy: str, kv_devices: int,
                weight_devices: int = 0, device_bytes: int, page_elems: int, kv_dtype: str,
                reserve_fraction: float = 0.0, weights_device_bytes: int | None = None,
                kv_planner: bool = False, check: bool = True) -> Plan:
  """The engine settings of `policy` for `fleet` on devices of `device_bytes` each.

  Args:
    fleet: model id -> FleetModel, in fleet order.
    policy: a memory policy's name (`EngineConfig.kv_policy`).
    kv_devices: KV groups (colocated) or KV-pool devices (weights-pool policies).
    weight_devices: weights-pool devices.
    device_bytes: memory budget of every device.
    page_elems, kv_dtype: the KV page (its bytes are the same for every policy).
    reserve_fraction: kept free on every device (activations, compiler scratch).
    weights_device_bytes: budget of a weights device, if not `device_bytes` (an ablation that
      needs more room for experts says so).
    kv_planner: a weights-pool policy splits the kv_devices + weight_devices devices itself
      (`Budget.kv_planner`; the plan's accounting says how: kv_devices, weight_devices).
    check: raise if the engine cannot serve the plan (else see `refusal`).

  Raises:
    ValueError: the budget cannot hold the fleet under `policy` (which model, why).
  """
  budget = Budget(device_bytes=device_bytes, page_elems=page_elems, kv_dtype=kv_dtype,
                  kv_devices=kv_devices, weight_devices=weight_devices,
                  reserve_fraction=reserve_fraction, weights_device_bytes=weights_device_bytes,
                  kv_planner=kv_planner)
  plan = get_policy(policy).plan(fleet, budget)
  if check:
    plan.check_servable()
  return plan


def refusal(plan: Plan) -> str | None:
  """Why the engine cannot serve `plan` (`Plan.check_servable`'s message), or None."""
  try:
    plan.check_servable()
  except ValueError as e:
    return str(e)
  return None
