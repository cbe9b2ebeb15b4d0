"""SwiGLU of the fused gate/up projection: silu(h13[:, :f]) * h13[:, f:], with a one-pass backward.

The MoE experts compute gate and up as ONE grouped GEMM into h13 (rows, 2f) (kernels/experts.py).
Eager PyTorch on the two strided halves costs several full passes and, in the backward, two
zero-filled (rows, 2f) slice gradients and their sum. Here the forward reads h13 once and writes h
once, and the backward reads h13 and dh once and writes dh13 once: on CUDA through two small
Triton kernels, elsewhere (CPU tests, no Triton) the same maths in eager PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

try:  # Triton is optional: CPU-only installs run the eager maths
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    @triton.jit
    def load_tile(h_ptr, rows, f, BM: tl.constexpr, BN: tl.constexpr):
        """This program's (BM, BN) tile: rows r, columns c, mask, offsets into h13, and the gate and
        up values a, b (fp32)."""
        r = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]
        c = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]
        mask = (r < rows) & (c < f)
        base = r.to(tl.int64) * (2 * f) + c
        a = tl.load(h_ptr + base, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(h_ptr + base + f, mask=mask, other=0.0).to(tl.float32)
        return r, c, mask, base, a, b

    @triton.jit
    def fwd(h_ptr, out_ptr, rows, f, BM: tl.constexpr, BN: tl.constexpr):
        r, c, mask, base, a, b = load_tile(h_ptr, rows, f, BM, BN)
        out = a * tl.sigmoid(a) * b
        tl.store(out_ptr + r.to(tl.int64) * f + c, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd(h_ptr, g_ptr, dh_ptr, rows, f, BM: tl.constexpr, BN: tl.constexpr):
        r, c, mask, base, a, b = load_tile(h_ptr, rows, f, BM, BN)
        g = tl.load(g_ptr + r.to(tl.int64) * f + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        da = g * b * s * (1.0 + a * (1.0 - s))
        db = g * a * s
        tl.store(dh_ptr + base, da.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + base + f, db.to(dh_ptr.dtype.element_ty), mask=mask)


def _use_triton(h13: torch.Tensor) -> bool:
    return triton is not None and h13.is_cuda and h13.shape[0] > 0


BM, BN = 16, 128


def _grid(rows: int, f: int) -> tuple[int, int]:
    return (rows + BM - 1) // BM, (f + BN - 1) // BN


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h13: torch.Tensor, f: int) -> torch.Tensor:
        h13 = h13.contiguous()
        ctx.save_for_backward(h13)
        ctx.f = f
        if not _use_triton(h13):
            return F.silu(h13[:, :f]) * h13[:, f:]
        out = h13.new_empty(h13.shape[0], f)
        fwd[_grid(h13.shape[0], f)](h13, out, h13.shape[0], f, BM=BM, BN=BN)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (h13,) = ctx.saved_tensors
        f = ctx.f
        g = g.contiguous()
        if not _use_triton(h13):
            a, b = h13[:, :f].float(), h13[:, f:].float()
            s = torch.sigmoid(a)
            gf = g.float()
            return torch.cat([gf * b * s * (1 + a * (1 - s)), gf * a * s], dim=1).to(h13.dtype), None
        dh = torch.empty_like(h13)
        bwd[_grid(h13.shape[0], f)](h13, g, dh, h13.shape[0], f, BM=BM, BN=BN)
        return dh, None


@torch.compiler.disable  # Triton launches behind Python dispatch: run eagerly inside compiled blocks
def swiglu(h13: torch.Tensor, f: int) -> torch.Tensor:
    """silu(h13[:, :f]) * h13[:, f:] for h13 of shape (rows, 2f), differentiable in h13."""
    if h13.dim() != 2 or h13.shape[1] != 2 * f:
        raise ValueError(f"swiglu needs h13 of shape (rows, {2 * f}), got {tuple(h13.shape)}")
    return _SwiGLU.apply(h13, f)
