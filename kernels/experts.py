"""The routed experts of an MoE layer behind one call: dispatch, the expert SwiGLU GEMMs, combine.

Why one facade: what happens between the router and the layer output is the part that has
interchangeable implementations, and they do not split at the same places. The unfused path sorts
the (token, slot) rows by expert (`dispatch`), runs two grouped GEMMs on a backend of
kernels/grouped_gemm.py with the SwiGLU between them, and un-permutes with the gate-weighted sum
(`combine`); the fused path (kernels/moe_fused.py) folds the gather, the SwiGLU and the combine into
its GEMMs, so it has no permuted rows to hand back. `expert_forward` hides that choice: the model's
`GroupedExperts` holds the weights and calls it, and an implementation can be swapped here without
touching the model. It takes plain values (tensors, strings), never a model or a config object, so
this package stays importable without moe_study (the import direction is stages -> moe_study ->
kernels).

Dropless: no capacity factor, no token is ever dropped. Slot (t, j) is token t's j-th chosen expert;
the sort is stable, so the permutation (and so every result) is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import moe_fused
from kernels.grouped_gemm import CHOICES, backend_problem, grouped_mm, resolve_backend
from kernels.permute import permute, unpermute
from kernels.swiglu import swiglu

# grouped GEMM backends (kernels.grouped_gemm) + "fused": the Triton expert block with the gather, SwiGLU
# and the gate-weighted combine fused into its GEMMs (kernels/moe_fused.py), its plain products on
# cutlass or torch_grouped; "auto" elsewhere
EXPERT_BACKENDS = (*CHOICES, "fused")


@dataclass
class Dispatch:
    """Where each routed slot sits in expert order: what the expert GEMMs and the combine share."""

    order: torch.Tensor  # (T*k,) flat (token, slot) index of each permuted row
    inverse: torch.Tensor  # (T*k,) permuted row of each flat (token, slot): order[inverse] = arange
    counts: torch.Tensor  # (E,) rows per expert
    offs: torch.Tensor  # (E,) int32 cumulative row ends (kernels.grouped_mm contract)


@dataclass
class ExpertResult:
    """The combined expert outputs and what produced them (the caller records the last two, so a
    run can say which kernels it measured and why a requested backend did not run)."""

    y: torch.Tensor  # (T, d) token-major, the gate-weighted sum over the k slots
    backend_used: str  # grouped GEMM backend that ran, or "fused+<plain backend>"
    fallback_reason: str | None  # why that differs from the request (None when it does not)


def expert_counts(indices: torch.Tensor, experts: int) -> torch.Tensor:
    """Rows routed to each expert, (E,) int64, without a host sync.

    torch.bincount sizes its output from the data, so on CUDA it waits for the GPU (a device-to-host
    copy); two per MoE layer stalled the whole step on the host (bench/train_mfu.py, H100).
    """
    flat = indices.reshape(-1)
    return torch.zeros(experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sort_keys(flat: torch.Tensor, experts: int) -> torch.Tensor:
    """The expert ids in the narrowest integer dtype that holds them: a radix sort does one pass per
    key byte (int64 keys took 8 onesweep passes on an H100, uint8 keys take 1). A stable sort's order
    does not depend on the key dtype, so route() gives the same permutation either way."""
    if experts <= 256:
        return flat.to(torch.uint8)
    return flat.to(torch.int16 if experts <= 32768 else torch.int32)


def route(indices: torch.Tensor, experts: int, counts: torch.Tensor | None = None) -> Dispatch:
    """The expert-sorted order of the (token, slot) pairs (a stable sort, so deterministic).

    `counts` (E,) int64 slots per expert, when the caller has them (the router counts them anyway),
    saves their recount; they must be expert_counts(indices, experts)."""
    flat = indices.reshape(-1)
    counts = expert_counts(flat, experts) if counts is None else counts
    order = torch.argsort(sort_keys(flat, experts), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Dispatch(order, inverse, counts, counts.cumsum(0).to(torch.int32))


def dispatch(x: torch.Tensor, indices: torch.Tensor, experts: int,
             counts: torch.Tensor | None = None) -> tuple[torch.Tensor, Dispatch]:
    """Rows of x repeated once per routed slot and sorted by expert, so each expert's rows are one
    contiguous block for the grouped GEMM.

    x: (T, d), indices: (T, k), counts: see route. Returns (x_perm (T*k, d), Dispatch).
    """
    d = route(indices, experts, counts)
    return permute(x, d.order, d.inverse, indices.shape[1]), d


def combine(y_perm: torch.Tensor, d: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """Inverse of dispatch: un-permute the expert outputs and sum the k slots with their weights."""
    return unpermute(y_perm, weights, d.order, d.inverse)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on (custom kernels are invisible to
    autocast, so the backends are chosen, and the fused kernels fed, by this dtype), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def fused_plan(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, backend: str) -> tuple[str | None, str | None]:
    """For backend "fused": (grouped GEMM backend of its plain products, None) when the fused
    kernels (kernels/moe_fused.py) take x, else (None, why not; None when not requested)."""
    if backend != "fused":
        return None, None
    why = moe_fused.problem(x)
    dtype = compute_dtype(x)
    if why is None and x.is_cuda and dtype != torch.bfloat16:
        why = f"the fused MoE kernels run in bfloat16 on CUDA, not {dtype}"
    if why is not None:
        return None, f"expert backend 'fused' -> 'auto': {why}"
    if not x.is_cuda:  # Triton's interpreter (tests): its own plain products
        return "triton", None
    probe = x.new_empty(0, x.shape[1], dtype=dtype)
    for plain in ("cutlass", "torch_grouped"):
        if backend_problem(plain, probe, w13) is None and backend_problem(
                plain, probe.new_empty(0, w2.shape[1]), w2) is None:
            return plain, None
    return None, "expert backend 'fused' -> 'auto': neither cutlass nor torch._grouped_mm runs here"


def fused(x: torch.Tensor, d: Dispatch, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
          plain: str) -> ExpertResult:
    """The combined expert outputs y (T, d) from token-major x and the gate weights (T, k), through
    the fused kernels (the combine folded into the down projection unless moe_fused.OPTIONS says
    otherwise). `plain` is fused_plan's backend for the products the kernels leave unfused."""
    dt = compute_dtype(x)
    k = weights.shape[1]
    y = moe_fused.fused_moe(x.to(dt), w13.to(dt), w2.to(dt), weights, (d.order // k).to(torch.int32),
                            d.order, d.inverse, d.offs, k, plain)
    why = moe_fused.combine_switch.reason
    return ExpertResult(y, f"fused+{plain}", why and f"fused combine -> 'unfused': {why}")


def grouped(x_perm: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, backend: str,
            why: str | None = None) -> ExpertResult:
    """The expert outputs of already permuted rows (still in expert order: y is y_perm here) by two
    grouped GEMMs with the SwiGLU between them; `why` is the reason a fused request fell back to this
    path (reported as the fallback reason)."""
    f = w2.shape[1]
    probe = x_perm.new_empty(0, x_perm.shape[1], dtype=compute_dtype(x_perm))  # chosen by device, dtype, shape
    b, why_b = resolve_backend("auto" if backend == "fused" else backend, probe, w13)
    if why_b is None:  # w2 (f, d) must suit the same backend, else both use the fallback
        b2, why_b = resolve_backend(b, probe.new_empty(0, f), w2)
        b = b2 if why_b is not None else b
    h13 = grouped_mm(x_perm, w13, offs, b)
    return ExpertResult(grouped_mm(swiglu(h13, f), w2, offs, b), b, why or why_b)


def expert_forward(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None,
                   w13: torch.Tensor, w2: torch.Tensor, backend: str = "auto") -> ExpertResult:
    """The routed SwiGLU experts of token-major x (T, d), combined: y (T, d) = sum_j weights[t, j] *
    expert_{indices[t, j]}(x[t]).

    weights (T, k) are the router's gate weights (differentiable), indices (T, k) its expert ids,
    counts (E,) int64 its slots per expert (None: recounted). w13 (E, d, 2f) is [w1 | w3] along its
    last dim (gate and up projections as one GEMM of N = 2f), w2 (E, f, d). `backend` is one of
    EXPERT_BACKENDS; a request that cannot run here falls back (to "auto", then "reference") and the
    result says what ran and why.
    """
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"expert backend {backend!r} is not one of {EXPERT_BACKENDS}")
    experts = w13.shape[0]
    plain, why = fused_plan(x, w13, w2, backend)
    if plain is not None:  # gather, SwiGLU, its backward and the combine fused into the expert GEMMs
        return fused(x, route(indices, experts, counts), weights, w13, w2, plain)
    x_perm, disp = dispatch(x, indices, experts, counts)
    res = grouped(x_perm, disp.offs, w13, w2, backend, why)
    return ExpertResult(combine(res.y, disp, weights), res.backend_used, res.fallback_reason)
