"""A discrete-event simulator of the serving engine at paper scale, in simulated time.

The real engine, scheduler, pools and expert policies, with a `SimExecutor` charging each
step a modelled time (`cost_model`) instead of running it. Layout and assumptions:
WORKSPACE.md, "The simulator".
"""

from crosspool_jax.sim.cost_model import CostModel, Efficiency, ExpertCall, pipelined_step_s
from crosspool_jax.sim.executor import SimClock, SimExecutor
from crosspool_jax.sim.routing import Router, Routing
from crosspool_jax.sim.simulator import SLO, SimModel, Simulation, simulate

__all__ = ["SLO", "CostModel", "Efficiency", "ExpertCall", "Router", "Routing", "SimClock",
           "SimExecutor", "SimModel", "Simulation", "pipelined_step_s", "simulate"]
