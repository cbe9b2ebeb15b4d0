"""Where the Triton kernels of kernels/ run: on CUDA tensors, or on CPU tensors in Triton's interpreter
when TRITON_INTERPRET=1 was set before Triton was imported (how the CPU tests check the kernels)."""

from __future__ import annotations

import logging
import os


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter in this process (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class KillSwitch:
    """A fast path that the first failed launch turns off for the rest of the process.

    The Triton kernels are speed choices, never maths choices (each has an eager twin that computes
    the same result), so a kernel that cannot compile or launch here must not fail a run: the caller
    trips the switch, which logs the reason once, and takes the eager path from then on. `reason` says
    why the switch is off (None while it is on)."""

    def __init__(self, log: logging.Logger, what: str, instead: str) -> None:
        self.log, self.what, self.instead = log, what, instead
        self.reason: str | None = None

    def __bool__(self) -> bool:
        """True once tripped (the fast path is off)."""
        return self.reason is not None

    def trip(self, where: str, err: BaseException) -> str:
        """Turn the fast path off (the first reason is kept and logged) and return the reason."""
        if self.reason is None:
            self.reason = f"{where}: {type(err).__name__}: {str(err).strip()[:200]}"
            self.log.warning("%s disabled, using %s (%s)", self.what, self.instead, self.reason)
        return self.reason

    def reset(self) -> None:
        """On again (tests)."""
        self.reason = None
