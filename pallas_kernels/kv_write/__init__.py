"""Writing new tokens' K/V into pages of the shared KV pool, in place (pool donated)."""

from pallas_kernels.kv_write.api import validate_inputs, write_kv
from pallas_kernels.kv_write.reference import write_kv_reference

__all__ = ["validate_inputs", "write_kv", "write_kv_reference"]
