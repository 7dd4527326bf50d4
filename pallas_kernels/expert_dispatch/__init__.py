"""Expert dispatch (MoE SwiGLU experts) reading a pooled weights buffer through a slot table."""

from pallas_kernels.expert_dispatch.api import expert_dispatch, validate_inputs
from pallas_kernels.expert_dispatch.kernel import TILING_TABLE, default_tiling
from pallas_kernels.expert_dispatch.reference import expert_dispatch_reference

__all__ = [
    "TILING_TABLE",
    "default_tiling",
    "expert_dispatch",
    "expert_dispatch_reference",
    "validate_inputs",
]
