"""Grouped GEMM for MoE experts: one matrix product per expert over that expert's rows.

After dispatch (stages/model.py) the routed token rows are sorted by expert, so expert e owns the
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
- "cutlass":       NVIDIA CUTLASS grouped GEMM through the `cutlass_cppgen` Python package
                   (nvidia-cutlass, CUDA only, imported lazily); backward is two more grouped
                   GEMMs (dx = dy w^T, dw = x^T dy per group).
- "auto":          torch_grouped on CUDA, reference on CPU.

Why torch_grouped is the GPU default: on an H100 in bf16 (results/bench/grouped_gemm_h100.md) it
runs 455-711 TFLOP/s forward at MoE shapes, close to one dense GEMM of the same size, while
cutlass_cppgen's grouped GEMM (SM80 kernels: the Python API has no Hopper grouped kernel) runs
97-337 and the reference loop 212-650 (fine at 8 big experts, poor at 64 small ones).

Why the fallback instead of an error: the backend is a speed choice, never a maths choice, so a
run must not fail (or silently differ) because a kernel lacks a dtype; the backend that actually
ran is recorded by the caller (`GroupedExperts.last_backend` in stages/model.py).
"""

from __future__ import annotations

import functools
import logging
import sys
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


@functools.cache
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
    return _torch_grouped_probe(x.device.type, x.dtype)


# ---------------------------------------------------------------------------------------- cutlass
def _cuda_python_shim() -> None:
    """Let cutlass_cppgen (written for cuda-python <= 12) import under cuda-python 13.

    cuda-python 13 moved `cuda.cudart`, `cuda.cuda`, `cuda.nvrtc` to `cuda.bindings.runtime`,
    `.driver`, `.nvrtc` and dropped `cuda.__version__`; alias the old names to the new modules.
    """
    import cuda  # noqa: F401  (namespace package of cuda-python)
    import cuda.bindings
    import cuda.bindings.driver
    import cuda.bindings.nvrtc
    import cuda.bindings.runtime

    pkg = sys.modules["cuda"]
    if not hasattr(pkg, "__version__"):
        pkg.__version__ = cuda.bindings.__version__
    for old, new in (("cudart", cuda.bindings.runtime), ("cuda", cuda.bindings.driver),
                     ("nvrtc", cuda.bindings.nvrtc)):
        sys.modules.setdefault(f"cuda.{old}", new)
        if not hasattr(pkg, old) or getattr(pkg, old) is not new:
            setattr(pkg, old, new)


@functools.lru_cache(maxsize=1)
def _cutlass() -> Any:
    """Import cutlass_cppgen once (raises ImportError/RuntimeError with the reason)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cutlass needs CUDA (no CUDA device visible)")
    _cuda_python_shim()
    import cutlass_cppgen

    return cutlass_cppgen


@functools.cache
def _cutlass_plan(dtype: torch.dtype, cc: int) -> Any:
    cg = _cutlass()
    return cg.op.GroupedGemm(element=dtype, layout=cg.LayoutType.RowMajor, element_accumulator=torch.float32,
                             cc=cc)


@functools.cache
def _cutlass_operation(dtype: torch.dtype, cc: int) -> tuple[Any, Any]:
    """(compiled grouped-GEMM operation, its epilogue arguments), built once per dtype.

    `GroupedGemm.plan.run` re-constructs and re-looks-up the kernel on every call (milliseconds of
    Python); every operand here is 16-byte aligned (see ALIGN), so one compiled kernel serves all
    calls and we launch it directly.
    """
    plan = _cutlass_plan(dtype, cc)
    plan.run_setup()
    op = plan.compile(plan.tile_description, alignment_A=ALIGN, alignment_B=ALIGN, alignment_C=ALIGN)
    return op, op.epilogue_type(plan.alpha, plan.beta)


def _cc() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


@functools.cache
def _cutlass_import_problem() -> str | None:
    try:
        _cutlass()
    except Exception as err:  # any import failure means "not available", with its reason
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"cutlass_cppgen unavailable: {type(err).__name__}: {first}"
    return None


def cutlass_problem(x: torch.Tensor, w: torch.Tensor) -> str | None:
    if x.device.type != "cuda":
        return f"cutlass runs on CUDA tensors only, got {x.device}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"cutlass grouped GEMM is wired for bfloat16/float16, not {x.dtype}"
    k, n = w.shape[1], w.shape[2]
    if k % ALIGN or n % ALIGN:
        return f"cutlass grouped GEMM here needs k and n divisible by {ALIGN}: k={k}, n={n}"
    return _cutlass_import_problem()


def _cutlass_groups(a_list: list[torch.Tensor], b_list: list[torch.Tensor],
                    d_list: list[torch.Tensor]) -> None:
    """D_i = A_i @ B_i for the non-empty groups (all row-major contiguous), on torch's stream."""
    keep = [i for i, a in enumerate(a_list) if a.shape[0] > 0 and a.shape[1] > 0 and b_list[i].shape[1] > 0]
    if not keep:
        return
    from cutlass_cppgen.backend.gemm_operation import GemmGroupedArguments
    from cutlass_cppgen.shape import GemmCoord

    stream = sys.modules["cuda.bindings.driver"].CUstream(torch.cuda.current_stream().cuda_stream)
    op, epilogue = _cutlass_operation(a_list[keep[0]].dtype, _cc())
    As = [a_list[i] for i in keep]
    Bs = [b_list[i] for i in keep]
    Ds = [d_list[i] for i in keep]
    sizes = [GemmCoord(a.shape[0], b.shape[1], a.shape[1]) for a, b in zip(As, Bs, strict=True)]
    args = GemmGroupedArguments(operation=op, problem_sizes=sizes, A=As, B=Bs, C=Ds, D=Ds, output_op=epilogue,
                                stream=stream)
    op.run(args)
    args.sync()  # waits, then frees the per-call pointer arrays the kernel reads


class _CutlassGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        sizes = _group_sizes(offs, x.shape[0])
        out = x.new_zeros(x.shape[0], w.shape[2])
        _cutlass_groups(list(x.split(sizes)), list(w.unbind(0)), list(out.split(sizes)))
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        sizes = ctx.sizes
        dy = dy.contiguous()
        dx = dw = None
        dys = list(dy.split(sizes))
        if ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x)
            wt = w.transpose(1, 2).contiguous()  # (E, n, k): dx_e = dy_e @ w_e^T
            _cutlass_groups(dys, list(wt.unbind(0)), list(dx.split(sizes)))
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(w)  # experts with no rows get a zero gradient
            xts, dys_padded = [], []
            for xe, dye in zip(x.split(sizes), dys, strict=True):
                # dw_e = x_e^T @ dy_e reduces over the expert's m_e rows, which are the leading
                # dimension of x_e^T: zero-pad m_e to a multiple of 8 so the operand keeps
                # CUTLASS's 16-byte alignment (an odd m_e has no kernel); zeros add nothing.
                m = xe.shape[0]
                pad = -m % ALIGN
                xt = xe.new_zeros(xe.shape[1], m + pad)
                xt[:, :m] = xe.t()
                xts.append(xt)
                dys_padded.append(torch.cat([dye, dye.new_zeros(pad, dye.shape[1])]) if pad else dye)
            _cutlass_groups(xts, dys_padded, list(dw.unbind(0)))
        return dx, dw, None


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
        _group_sizes(offs, x.shape[0])  # same offset validation as the other backends
        return _torch_grouped(x, w, offs)
    if name == "cutlass":
        return _CutlassGroupedMM.apply(x, w, offs)
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
