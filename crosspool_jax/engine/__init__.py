"""Multi-model serving: requests, scheduler, executors, metrics, the engine."""

from crosspool_jax.engine.engine import Engine, EngineConfig, TokenEvent
from crosspool_jax.engine.request import Request, Status

__all__ = ["Engine", "EngineConfig", "Request", "Status", "TokenEvent"]
