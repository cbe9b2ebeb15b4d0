"""Expert kernels for the MoE layers (grouped GEMM with interchangeable backends).

The model calls this package through two entry points: kernels.experts (dispatch, expert GEMMs,
combine) and kernels.router (the fused router). Nothing here imports moe_study or stages.
"""

from kernels.grouped_gemm import (
    BACKENDS,
    CHOICES,
    GroupedGemmError,
    available_backends,
    backend_status,
    grouped_mm,
    resolve_backend,
    run_backend,
)

__all__ = [
    "BACKENDS",
    "CHOICES",
    "GroupedGemmError",
    "available_backends",
    "backend_status",
    "grouped_mm",
    "resolve_backend",
    "run_backend",
]
