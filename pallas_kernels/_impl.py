"""Choosing a kernel implementation: Pallas on GPU/TPU, the jnp reference on CPU."""

from __future__ import annotations

from typing import Literal

import jax

Impl = Literal["pallas", "interpret", "reference"]
IMPLS: tuple[str, ...] = ("pallas", "interpret", "reference")


def resolve_impl(impl: str | None, *, pallas_backends: tuple[str, ...] = ("gpu", "tpu")) -> str:
  """Returns the implementation to run.

  Args:
    impl: "pallas" (compiled kernel), "interpret" (the same kernel run by the Pallas
      interpreter, for CPU tests), "reference" (plain jnp) or None for the default
      of the current backend: "pallas" where the kernel has a lowering
      (`pallas_backends`), "reference" elsewhere.
    pallas_backends: backends the kernel lowers for.
  """
  if impl is None:
    return "pallas" if jax.default_backend() in pallas_backends else "reference"
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
  return impl
