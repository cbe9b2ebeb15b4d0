"""Grouped GEMM for MoE experts: one matrix product per expert over that expert's rows.

After dispatch (kernels/experts.py) the routed token rows are sorted by expert, so expert e owns the
contiguous row range [offs[e-1], offs[e]) of `x`. `grouped_mm(x, w, offs)` returns, for every e,
`x[rows of e] @ w[e]` stacked in the same row order: the whole expert FFN is three such calls
instead of E small matmuls (MegaBlocks' "dropless" formulation: no capacity, no padding).

Backends (all differentiable, all the same maths):
- "reference":     a Python loop of E matmuls. The ground truth of the tests and the CPU path; its
                   backward is torch autograd through split/unbind/cat, so it needs no hand-written
                   gradient and runs in float64 for gradcheck.
- "torch_grouped": torch._grouped_mm, one fused kernel (the fast path on Hopper GPUs in bf16). It
                   needs float32/bfloat16/float16, int32 offsets and 16-byte aligned strides; on
                   CUDA it also needs a GPU it has kernels for. Unsupported inputs fall back to
                   the reference loop with a logged reason (see `resolve_backend`).
- "cutlass":       our CUDA extension (kernels/cutlass_ext.py, kernels/csrc/): CUTLASS's Hopper
                   ptr-array TMA warp-specialized grouped GEMM, bf16 in/out, fp32 accumulate, built
                   with nvcc on first use from the headers of the nvidia-cutlass wheel. Problem sizes
                   and operand pointers are built on the device from `offs` (no host sync per call);
                   backward is two more grouped GEMMs (dx = dy w^T reading w transposed in place,
                   dw = x^T dy with the per-expert row count as the reduction length).
- "auto":          torch_grouped on CUDA, reference on CPU.

Speeds (H100, bf16): results/kernels/grouped_gemm_h100.md (`bench/kernels_bench.py`).

Why the fallback instead of an error: the backend is a speed choice, never a maths choice, so a
run must not fail (or silently differ) because a kernel lacks a dtype; the backend that actually
ran is returned by kernels/experts.py (`GroupedExperts.last_backend` in moe_study/model/).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger("kernels.grouped_gemm")

BACKENDS = ("reference", "torch_grouped", "cutlass")
CHOICES = ("auto", *BACKENDS)
ALIGN = 8  # elements of 16 bits: the 16-byte operand alignment of the CUTLASS kernels used here


class GroupedGemmError(ValueError):
    """Inputs that no backend can multiply (bad shapes, offsets or dtypes); the message says which."""


# ------------------------------------------------------------------------------------- validation
def check_inputs(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> None:
    """Shape/dtype contract shared by every backend; raises GroupedGemmError naming the problem."""
    if x.dim() != 2:
        raise GroupedGemmError(f"x must be 2-D (rows, k), got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise GroupedGemmError(f"w must be 3-D (experts, k, n), got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise GroupedGemmError(f"x has k={x.shape[1]} columns but w has k={w.shape[1]} rows per expert")
    if offs.dim() != 1 or offs.shape[0] != w.shape[0]:
        raise GroupedGemmError(
            f"offs must be 1-D with one end per expert ({w.shape[0]}), got {tuple(offs.shape)}")
    if offs.dtype != torch.int32:
        raise GroupedGemmError(f"offs must be int32 cumulative row ends, got {offs.dtype}")
    if x.dtype != w.dtype:
        raise GroupedGemmError(f"x is {x.dtype} but w is {w.dtype}")
    if x.device != w.device or x.device != offs.device:
        raise GroupedGemmError(f"x, w, offs on different devices: {x.device}, {w.device}, {offs.device}")


def _group_sizes(offs: torch.Tensor, rows: int) -> list[int]:
    ends = offs.tolist()
    sizes = [e - s for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    if any(n < 0 for n in sizes):
        raise GroupedGemmError(f"offs must be non-decreasing, got {ends}")
    if ends and ends[-1] != rows:
        raise GroupedGemmError(f"offs[-1]={ends[-1]} must equal the number of rows of x ({rows})")
    return sizes


# -------------------------------------------------------------------------------------- reference
def _reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """E plain matmuls; split/unbind (not slicing) keep the backward O(rows) instead of O(E rows)."""
    sizes = _group_sizes(offs, x.shape[0])
    parts = [xe @ we for xe, we in zip(x.split(sizes), w.unbind(0), strict=True)]
    return torch.cat(parts, 0)


# ---------------------------------------------------------------------------------- torch_grouped
class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects expanded gradients (e.g. the stride-0 gradient of
    `y.sum()`), which a downstream op may legitimately produce.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


def _torch_grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    y = torch._grouped_mm(x.contiguous(), w, offs=offs)
    return _ContiguousGrad.apply(y)


_PROBED: dict[tuple[str, torch.dtype], str | None] = {}


def _torch_grouped_verdict(device: str, dtype: torch.dtype) -> str | None:
    """The probe's verdict for (device, dtype), probing once per process.

    Inside torch.compile, a probed pair is a plain dict lookup, which Dynamo folds into a constant (with a
    guard on the dict). Dynamo traces through functools.cache, so a cached probe was traced on every
    compile and broke the graph at its torch.Generator: the MoE layer compiled as several graphs. An
    unprobed pair runs the probe eagerly (`torch.compiler.disable`), once."""
    key = (device, dtype)
    if key in _PROBED:
        return _PROBED[key]
    return _probe_eagerly(device, dtype)


@torch.compiler.disable
def _probe_eagerly(device: str, dtype: torch.dtype) -> str | None:
    _PROBED[(device, dtype)] = verdict = _torch_grouped_probe(device, dtype)
    return verdict


def _torch_grouped_probe(device: str, dtype: torch.dtype) -> str | None:
    """Run torch._grouped_mm forward+backward once on tiny aligned inputs; None if it works."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(24, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        w = torch.randn(3, 16, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        y = torch._grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        ref = _reference(x.detach().float(), w.detach().float(), offs)
        err = (y.detach().float() - ref).abs().max().item()
        if not err <= 0.05 * ref.abs().max().item() + 1e-3:
            return f"torch._grouped_mm gave wrong results on {device}/{dtype} (max error {err:.3g})"
    except (RuntimeError, NotImplementedError, TypeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"torch._grouped_mm fails on {device}/{dtype}: {msg}"
    return None


def torch_grouped_problem(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why torch._grouped_mm cannot take these operands (None when it can)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm takes float32/bfloat16/float16, not {x.dtype}"
    size = x.element_size()
    k, n = w.shape[1], w.shape[2]
    if (k * size) % 16 or (n * size) % 16:
        return f"torch._grouped_mm needs 16-byte aligned strides: k={k}, n={n} at {size} bytes per element"
    return _torch_grouped_verdict(x.device.type, x.dtype)


# ---------------------------------------------------------------------------------------- cutlass
def cutlass_problem(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why the SM90 CUTLASS extension (kernels/cutlass_ext.py) cannot take these operands (None when it can)."""
    if x.device.type != "cuda":
        return f"cutlass runs on CUDA tensors only, got {x.device}"
    if x.dtype != torch.bfloat16:
        return f"the cutlass grouped GEMM is built for bfloat16, not {x.dtype}"
    k, n = w.shape[1], w.shape[2]
    if k % ALIGN or n % ALIGN:
        return f"cutlass needs 16-byte rows: k and n divisible by {ALIGN}, got k={k}, n={n}"
    from kernels import cutlass_ext

    return cutlass_ext.problem()


def product(kind: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    """One grouped product, no autograd, on "cutlass" or "torch_grouped" (the pieces of a backward
    pass; kernels/moe_fused.py composes them too):
      fwd: a (rows, k) @ b[e] (k, n)        -> (rows, n)
      dx:  a (rows, n) @ b[e]^T, b (E, k, n) -> (rows, k)   (b read transposed in place)
      dw:  a[rows of e]^T @ b[rows of e]     -> (E, a.shape[1], b.shape[1]); experts without rows zeroed
    """
    if backend == "torch_grouped":
        if kind == "fwd":
            return torch._grouped_mm(a, b, offs=offs)
        if kind == "dx":
            return torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(a.t(), b, offs=offs)
    if backend != "cutlass":
        raise GroupedGemmError(f"no plain grouped product on backend {backend!r}")
    from kernels import cutlass_ext

    if kind == "fwd":
        out = a.new_empty(a.shape[0], b.shape[2])
        cutlass_ext.run("fwd", offs, a, b, out, b.shape[1], b.shape[2])
    elif kind == "dx":
        out = a.new_empty(a.shape[0], b.shape[1])
        cutlass_ext.run("dx", offs, a, b, out, b.shape[1], b.shape[2])
    else:
        out = a.new_empty(offs.shape[0], a.shape[1], b.shape[1])
        cutlass_ext.run("dw", offs, a, b, out, a.shape[1], b.shape[1])
    return out


class _CutlassGroupedMM(torch.autograd.Function):
    """Three grouped GEMMs of the SM90 extension; offsets stay on the device (no host sync).

    The offsets are trusted here (monotone, ending at rows): validating them would need the host
    copy this path exists to avoid; the reference backend validates the same contract.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, offs)
        return product("fwd", x, w, offs, "cutlass")

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = product("dx", dy, w, offs, "cutlass") if ctx.needs_input_grad[0] else None
        dw = product("dw", x, dy, offs, "cutlass") if ctx.needs_input_grad[1] else None
        return dx, dw, None


@torch.compiler.disable  # a pybind extension call: run eagerly inside compiled blocks
def _cutlass_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _CutlassGroupedMM.apply(x, w, offs)


# ------------------------------------------------------------------------------------ the dispatch
def backend_problem(backend: str, x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why `backend` cannot run these operands (None when it can)."""
    if backend == "reference":
        return None
    if backend == "torch_grouped":
        return torch_grouped_problem(x, w)
    if backend == "cutlass":
        return cutlass_problem(x, w)
    raise GroupedGemmError(f"unknown grouped GEMM backend {backend!r}; choose one of {CHOICES}")


@functools.cache
def _warn_once(msg: str) -> None:
    log.warning(msg)


def resolve_backend(backend: str, x: torch.Tensor, w: torch.Tensor) -> tuple[str, str | None]:
    """(backend that will run, reason it differs from the request or None)."""
    if backend not in CHOICES:
        raise GroupedGemmError(f"unknown grouped GEMM backend {backend!r}; choose one of {CHOICES}")
    wanted = backend
    if backend == "auto":
        wanted = "torch_grouped" if x.device.type == "cuda" else "reference"
    problem = backend_problem(wanted, x, w)
    if problem is None:
        return wanted, None
    reason = f"grouped_mm backend {wanted!r} -> 'reference': {problem}"
    if backend != "auto":  # an explicit request that cannot be met is worth a warning
        _warn_once(reason)
    return "reference", reason


def _autocast(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom ops are invisible to autocast: cast both operands to the autocast dtype ourselves."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return x.to(dt), w.to(dt)
    if x.dtype != w.dtype:
        return x, w.to(x.dtype)
    return x, w


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]; rows of e are [offs[e-1], offs[e]) (offs[-1] == rows).

    x: (rows, k), w: (E, k, n), offs: int32 (E,) cumulative row ends. Returns (rows, n), with
    autograd for x and w. Experts with no rows are allowed (their w gets a zero gradient).
    """
    x, w = _autocast(x, w)
    check_inputs(x, w, offs)
    name, _ = resolve_backend(backend, x, w)
    return run_backend(name, x, w, offs)


def run_backend(name: str, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Run exactly `name` (no fallback): the benchmark and the tests use this to force a backend."""
    if name == "reference":
        return _reference(x, w, offs)
    if name == "torch_grouped":
        if not offs.is_cuda:  # same validation as the reference; on a GPU it would cost a host sync per call
            _group_sizes(offs, x.shape[0])
        return _torch_grouped(x, w, offs)
    if name == "cutlass":
        return _cutlass_grouped_mm(x, w, offs)
    raise GroupedGemmError(f"unknown grouped GEMM backend {name!r}; choose one of {BACKENDS}")


def backend_status(device: str | None = None, dtype: torch.dtype | None = None) -> dict[str, str | None]:
    """For each backend, None if it runs on (device, dtype), else the reason it does not.

    Defaults: CUDA in bfloat16 when a GPU is visible, else CPU in float32 (the training defaults).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda" and not torch.cuda.is_available():
        return {b: "no CUDA device visible" for b in BACKENDS}
    x = torch.zeros(16, 16, device=device, dtype=dtype)
    w = torch.zeros(2, 16, 16, device=device, dtype=dtype)
    return {b: backend_problem(b, x, w) for b in BACKENDS}


def available_backends(device: str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """The backends that run on (device, dtype) here, in BACKENDS order."""
    return [b for b, problem in backend_status(device, dtype).items() if problem is None]
