"""The capacity analysis: what each memory policy's plan holds at one budget, probed on the
real host pools (`measure`), for configs of real checkpoints (`references`) or any fleet."""

from crosspool_jax.capacity.measure import (
  ORGANISATIONS,
  format_table,
  format_totals,
  measure_capacity,
)
from crosspool_jax.capacity.references import REFERENCE_HF_CONFIGS, reference_config

__all__ = ["ORGANISATIONS", "REFERENCE_HF_CONFIGS", "format_table", "format_totals",
           "measure_capacity", "reference_config"]
