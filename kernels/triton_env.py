"""Where the Triton kernels of kernels/ run: on CUDA tensors, or on CPU tensors in Triton's interpreter
when TRITON_INTERPRET=1 was set before Triton was imported (how the CPU tests check the kernels)."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter in this process (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
