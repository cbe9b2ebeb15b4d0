"""Expert kernels for the MoE layers (grouped GEMM with interchangeable backends)."""

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
