"""Token permutation of the MoE layer: to expert order (dispatch) and back with the gate weights
(combine), each a differentiable op whose forward and backward are single gather passes.

Slot (t, j) of token t (its j-th chosen expert) sits at permuted row inverse[t*k + j]; `order` is
the inverse permutation (order[inverse] = arange). Then
    permute:   x_perm[inverse[t*k+j]] = x[t]                 backward: dx[t] = sum_j g[inverse[t*k+j]]
    unpermute: y[t] = sum_j w[t,j] * y_perm[inverse[t*k+j]]   backward: dy_perm[inverse[t*k+j]] = w[t,j] g[t],
                                                                       dw[t,j] = <g[t], y_perm[inverse[t*k+j]]>
Autograd's own index_select backward is a scatter-add (atomics), and a (T,1,k)@(T,k,d) bmm for the
weighted sum runs far below bandwidth; measured on an H100 (bench/profile_layer.py) the eager
versions of these four steps took ~2.3 ms of a 4.8 ms MoE layer step at T=16384, top-8 of 64,
d=1024. On CUDA each step here is one Triton kernel, one program per token, that reads and writes
every row once (fp32 sums); elsewhere (CPU tests, no Triton) the same maths runs in eager PyTorch.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from kernels.triton_env import KillSwitch

log = logging.getLogger("kernels.permute")


@functools.cache
def _kernels() -> dict[str, Any] | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # one program per token; BD (a power of two >= d) covers the whole row, so no column loop
    @triton.jit
    def scatter_rows(x_ptr, inv_ptr, w_ptr, out_ptr, d, K: tl.constexpr, BD: tl.constexpr, WEIGHTED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BD)
        mask = cols < d
        row = tl.load(x_ptr + t * d + cols, mask=mask)
        for j in tl.static_range(K):
            dst = tl.load(inv_ptr + t * K + j).to(tl.int64)
            if WEIGHTED:
                wj = tl.load(w_ptr + t * K + j).to(tl.float32)
                tl.store(out_ptr + dst * d + cols, (wj * row.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(out_ptr + dst * d + cols, row, mask=mask)

    @triton.jit
    def gather_sum(g_ptr, inv_ptr, w_ptr, out_ptr, d, K: tl.constexpr, BD: tl.constexpr,
                   WEIGHTED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BD)
        mask = cols < d
        acc = tl.zeros([BD], dtype=tl.float32)
        for j in tl.static_range(K):
            src = tl.load(inv_ptr + t * K + j).to(tl.int64)
            v = tl.load(g_ptr + src * d + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * d + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def unpermute_bwd(g_ptr, y_ptr, inv_ptr, w_ptr, dy_ptr, dw_ptr, d, K: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BD)
        mask = cols < d
        g = tl.load(g_ptr + t * d + cols, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            src = tl.load(inv_ptr + t * K + j).to(tl.int64)
            wj = tl.load(w_ptr + t * K + j).to(tl.float32)
            y = tl.load(y_ptr + src * d + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dw_ptr + t * K + j, tl.sum(g * y, axis=0))
            tl.store(dy_ptr + src * d + cols, (wj * g).to(dy_ptr.dtype.element_ty), mask=mask)

    return {"scatter_rows": scatter_rows, "gather_sum": gather_sum, "unpermute_bwd": unpermute_bwd}


_switch = KillSwitch(log, "kernels.permute: the Triton path", "eager gathers")


def _fast(*ts: torch.Tensor) -> dict[str, Any] | None:
    """The Triton kernels when every tensor is on CUDA (and Triton is importable), else None."""
    if _switch or not all(t.is_cuda for t in ts):
        return None
    return _kernels()


def _launch(kern: dict[str, Any], name: str, grid: tuple[int, ...], *args: Any, **meta: Any) -> bool:
    """Launch one kernel; on a compile/launch error log it once, use eager maths from then on, and
    return False so the caller computes this call eagerly too (the ops' results never depend on
    which path ran)."""
    try:
        kern[name][grid](*args, **meta)
    except Exception as err:  # e.g. a Triton version that cannot compile these kernels
        _switch.trip(name, err)
        return False
    return True


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two >= n and >= floor (a power of two): Triton block sizes must be powers of two."""
    return 1 << max(floor.bit_length() - 1, (n - 1).bit_length())


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        kern = _fast(x, inverse)
        if kern is not None and x.shape[0] > 0:
            x = x.contiguous()
            out = x.new_empty(x.shape[0] * k, x.shape[1])
            if _launch(kern, "scatter_rows", (x.shape[0],), x, inverse, x, out, x.shape[1], K=k,
                       BD=pow2_at_least(x.shape[1]), WEIGHTED=False):
                return out
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return sum_slots(g, inverse, ctx.k), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_perm: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
        T, k = weights.shape
        d = y_perm.shape[1]
        ctx.save_for_backward(y_perm, weights, order, inverse)
        kern = _fast(y_perm, inverse)
        if kern is not None and T > 0:
            y = y_perm.new_empty(T, d)
            if _launch(kern, "gather_sum", (T,), y_perm.contiguous(), inverse, weights.contiguous(), y, d, K=k,
                       BD=pow2_at_least(d), WEIGHTED=True):
                return y
        yk = y_perm.index_select(0, inverse).view(T, k, d)
        return (yk * weights.unsqueeze(-1).to(yk.dtype)).sum(dim=1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        y_perm, weights, order, inverse = ctx.saved_tensors
        T, k = weights.shape
        d = y_perm.shape[1]
        g = g.contiguous()
        kern = _fast(g, inverse)
        if kern is not None and T > 0:
            dy_perm = torch.empty_like(y_perm)
            dw = torch.empty(T, k, device=g.device, dtype=torch.float32)
            if _launch(kern, "unpermute_bwd", (T,), g, y_perm.contiguous(), inverse, weights.contiguous(), dy_perm,
                       dw, d, K=k, BD=pow2_at_least(d)):
                return dy_perm, dw.to(weights.dtype), None, None
        w = weights.to(g.dtype)
        dy_perm = g.index_select(0, order // k) * w.reshape(-1).index_select(0, order).unsqueeze(-1)
        yk = y_perm.index_select(0, inverse).view(T, k, d)
        dw = (yk * g.unsqueeze(1)).sum(-1).to(weights.dtype)
        return dy_perm, dw, None, None


def sum_slots(g: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """(T*k, d) rows in expert order -> (T, d): out[t] = sum_j g[inverse[t*k+j]] (fp32 sums).

    The gradient of permute; also the input gradient of the fused expert block (kernels/moe_fused.py)."""
    d = g.shape[-1]
    T = inverse.numel() // k
    kern = _fast(g, inverse)
    if kern is not None and T > 0:
        g = g.contiguous()
        out = g.new_empty(T, d)
        if _launch(kern, "gather_sum", (T,), g, inverse, g, out, d, K=k, BD=pow2_at_least(d), WEIGHTED=False):
            return out
    gk = g.index_select(0, inverse).view(T, k, d)
    return gk.sum(dim=1, dtype=torch.float32).to(g.dtype)


def scatter_weighted(g: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                     inverse: torch.Tensor) -> torch.Tensor:
    """g (T, d) -> (T*k, d) in expert order: row inverse[t*k+j] = weights[t, j] * g[t] (no autograd).

    The gradient of the expert rows under the weighted combine, without the gate-weight gradient
    unpermute's backward also computes (kernels/moe_fused.py gets that from a GEMM epilogue), so y_perm
    is not read: one pass reading g once and writing each row."""
    T, k = weights.shape
    d = g.shape[-1]
    kern = _fast(g, inverse)
    if kern is not None and T > 0:
        g = g.contiguous()
        out = g.new_empty(T * k, d)
        if _launch(kern, "scatter_rows", (T,), g, inverse, weights.contiguous(), out, d, K=k, BD=pow2_at_least(d),
                   WEIGHTED=True):
            return out
    return g.index_select(0, order // k) * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(g.dtype)


@torch.compiler.disable  # Triton launches behind Python dispatch: run eagerly inside compiled blocks
def permute(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """x (T, d) -> x_perm (T*k, d) in expert order: x_perm[i] = x[order[i] // k]."""
    return _Permute.apply(x, order, inverse, k)


@torch.compiler.disable  # Triton launches behind Python dispatch: run eagerly inside compiled blocks
def unpermute(y_perm: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """y_perm (T*k, d) in expert order -> y (T, d) = sum over the k slots of weights * rows."""
    return _Unpermute.apply(y_perm, weights, order, inverse)
