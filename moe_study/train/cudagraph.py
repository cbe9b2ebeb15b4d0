"""A whole training step as CUDA graphs (train.cuda_graph, torch engine, one GPU, no gradient accumulation;
the default there: train.cuda_graph auto, moe_study/train/speed.py).

Why: at the study's shapes (d_model 256, ~20M params, 64k tokens per step) an MoE step launches
thousands of small kernels and the GPU waits on the host between them (bench/study_step.py's profile);
`torch.compile(mode="reduce-overhead")` graphs only the compiled blocks between graph breaks and
leaves the optimizer, the loss bookkeeping and the MoE's Triton permutation outside. Here the step
is two graphs, replayed with one launch each:

- A: forward (autocast without its weight cache) + loss + backward + the packed step values (float64
  cross-entropy, aux, z, flattened load: exactly the loop's `packed`) + the pre-clip gradient norm;
- B: clip by that norm + AdamW (fused, capturable, learning rate as a device tensor).

The loop's host sync stays between them, so the NaN / norm checks still run before the update. The
first `warmup` steps run eagerly (compilation, Triton autotuning, the optimizer's state), then A is
captured; gradients are allocated by the captured backward, so they live at fixed addresses and are
overwritten (not accumulated) by each replay, and `zero_grad` is never called again.

Numerics: the same kernels as the eager step on the same shapes, except AdamW's capturable variant
keeps its step count on the device (bias corrections in float32 on the GPU): the same maths, results
within rounding of the eager GPU path. CPU never gets here (byte-identical CPU runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("stages.train")


def graph_problem(device: torch.device, accumulation: int, world: int, fault: Any) -> str | None:
    """Why a step cannot be graphed here (None when it can)."""
    if device.type != "cuda":
        return f"train.cuda_graph needs CUDA, not {device.type}"
    if accumulation != 1:
        return f"train.cuda_graph needs one micro-batch per step (gradient accumulation is {accumulation})"
    if world != 1:
        return "train.cuda_graph runs one process (the gradient all-reduce is not captured)"
    if fault is not None:
        return "fault injection is on"
    return None


class StepGraphs:
    """Graph A (forward+backward) and graph B (clip+optimizer) of one engine; see the module docstring."""

    def __init__(self, engine: Any, micro: int, seq_len: int, warmup: int = 3) -> None:
        self.engine = engine
        self.warmup = warmup
        dev = engine.device
        self.x = torch.zeros(micro, seq_len, dtype=torch.long, device=dev)
        self.y = torch.zeros(micro, seq_len, dtype=torch.long, device=dev)
        self.calls = 0
        self.fwd: torch.cuda.CUDAGraph | None = None
        self.opt: torch.cuda.CUDAGraph | None = None
        self.packed: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.pool: Any = None
        self.load_shape: tuple[int, ...] | None = None
        self.disabled: str | None = None  # why the step stays eager after the warm-up (None: graphed)

    @property
    def captured(self) -> bool:
        return self.fwd is not None

    def _body(self, loss_fn: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.engine.forward(self.x, self.y, cache=False)
        loss_fn(out).backward()
        sums = torch.stack([out.ce.detach(), out.aux_loss.detach(), out.z_loss.detach()]).double()
        packed = sums if out.load is None else torch.cat([sums, out.load.detach().double().reshape(-1)])
        self.load_shape = None if out.load is None else tuple(out.load.shape)
        return packed, self.engine.grad_norm()

    def forward_backward(self, mb: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
        """(packed step values, pre-clip norm, load shape) of micro-batch `mb` (micro, seq_len + 1);
        the gradients are left in the parameters' .grad."""
        self.x.copy_(mb[:, :-1], non_blocking=True)
        self.y.copy_(mb[:, 1:], non_blocking=True)
        if self.fwd is None and (self.calls < self.warmup or self.disabled is not None):
            self.calls += 1
            return (*self._body(loss_fn), self.load_shape)
        if self.fwd is None:
            self.disabled = self._problem()
            if self.disabled is None:
                try:
                    self._capture(loss_fn)
                except Exception as err:  # e.g. a host sync in some op: train on, eagerly
                    self.fwd = None
                    self.disabled = f"capture failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    torch.cuda.synchronize()
            if self.disabled is not None:
                log.warning("train.cuda_graph off: %s", self.disabled)
                self.engine.optimizer.zero_grad(set_to_none=True)
                return (*self._body(loss_fn), self.load_shape)
        assert self.fwd is not None
        self.fwd.replay()
        assert self.packed is not None and self.norm is not None
        return self.packed, self.norm, self.load_shape

    def _problem(self) -> str | None:
        """Why the warmed-up model cannot be captured (None: try): a layer on the reference expert GEMMs
        reads its group sizes on the host (kernels/grouped_gemm.py)."""
        backends = getattr(self.engine.module, "expert_backends", lambda: {})() or {}
        bad = sorted({v for k, v in backends.items() if not k.endswith("fallback") and v == "reference"})
        return "an MoE layer runs the reference expert GEMMs (a host sync per call)" if bad else None

    def _capture(self, loss_fn: Callable[[Any], torch.Tensor]) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.packed, self.norm = self._body(loss_fn)
        self.fwd, self.pool = g, g.pool()
        log.info("train.cuda_graph: forward+backward captured")

    def optimizer_step(self, step: Callable[[], None]) -> None:
        """Run `step` (clip + optimizer, no zero_grad) eagerly before the forward graph exists, then as graph B."""
        if self.fwd is None:
            step()
            self.engine.optimizer.zero_grad(set_to_none=True)
            return
        if self.opt is None:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                step()
            self.opt = g
            log.info("train.cuda_graph: clip+optimizer captured")
        self.opt.replay()
