"""The decoder LM of the study: dense SwiGLU or top-k routed MoE, in one readable file.

The architecture is fixed by moe_study/accounting.py (whose formulas the planner uses to equalise
non-vocabulary parameters N and compute C): pre-norm blocks of RMSNorm (weight only), causal
attention (q, k, v, o; GQA, optional q/k/v biases and q/k norms) with rotary positions (no
parameters), and a SwiGLU FFN, or an MoE layer of E SwiGLU experts behind a bias-free linear router
plus optional always-active shared experts; MoE models may keep their first layers (or all but
every n-th) dense. `count_nonvocab_params` counts the
real module so a test can prove it equals `Architecture.nonvocab_total / nonvocab_active`.

MoE layout (torchtitan style, kept as three parts so each can be tested alone):
- `Router`: softmax over E logits, top-k, renormalised top-k weights, Switch/GShard
  load-balancing loss E * sum_i f_i P_i, optional router z-loss mean(logsumexp(logits)^2).
- `dispatch` / `combine`: sort the (token, slot) pairs by expert so each expert's rows are
  contiguous (per-expert counts and int32 cumulative offsets), and the inverse permutation with
  the weighted sum over the k slots. Dropless: no capacity factor, no token is ever dropped.
- `GroupedExperts`: the E experts as stacked (E, d, f) / (E, f, d) weights computed by
  `kernels.grouped_mm` (reference loop on CPU, one grouped kernel on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels import grouped_mm, moe_fused, resolve_backend
from kernels import router as fused_router
from kernels.grouped_gemm import CHOICES, backend_problem
from kernels.permute import permute, unpermute
from kernels.swiglu import swiglu
from moe_study.config.schema import RouterConfig
from moe_study.model.layers import ModelConfigError, SwiGLU

# grouped GEMM backends (kernels.grouped_gemm) + "fused": the Triton expert block with the gather, SwiGLU
# and the gate-weighted combine fused into its GEMMs (kernels/moe_fused.py), its plain products on
# cutlass or torch_grouped; "auto" elsewhere
EXPERT_BACKENDS = (*CHOICES, "fused")


# -------------------------------------------------------------------------------------------- MoE
@dataclass
class RouterOutput:
    weights: torch.Tensor  # (T, k) renormalised top-k probabilities
    indices: torch.Tensor  # (T, k) expert ids
    aux_loss: torch.Tensor  # scalar, E * sum_i f_i P_i (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)^2
    load: torch.Tensor  # (E,) fraction of the T*k routed slots that went to each expert
    counts: torch.Tensor | None = None  # (E,) int64 routed slots per expert (route() reuses them)


def expert_counts(indices: torch.Tensor, experts: int) -> torch.Tensor:
    """Rows routed to each expert, (E,) int64, without a host sync.

    torch.bincount sizes its output from the data, so on CUDA it waits for the GPU (a device-to-host
    copy); two per MoE layer stalled the whole step on the host (bench/train_mfu.py, H100).
    """
    flat = indices.reshape(-1)
    return torch.zeros(experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class Router(nn.Module):
    """Bias-free linear gate, top-k over softmax or sigmoid scores, renormalised weights, and the
    balancing losses; optionally DeepSeek-V3's aux-loss-free bias balancing.

    Bias balancing: `expert_bias` (a buffer: saved with the model, never touched by the optimizer)
    is added to the scores for choosing the top-k experts only; the gate weights are the unbiased
    scores. Each training forward adds its per-expert slot counts to `pending_load`; after the
    optimizer step `update_bias()` moves every bias by rate * sign(mean load - load) (all-reduced
    over data-parallel ranks when torch.distributed is up) and clears the counts, so an overloaded
    expert gets picked less and an idle one more, without a gradient that fights the LM loss.

    On CUDA the maths after the gate GEMM runs in the Triton kernels of kernels/router.py (two launches
    forward, one backward, deterministic; ties in the top-k go to the lowest expert id), unless
    kernels.router.OPTIONS["router"] is "eager"; `_eager` is the reference and what CPU runs. Both
    return the per-expert slot counts, which route() reuses. `last_path` says which one ran.
    """

    def __init__(self, d: int, experts: int, top_k: int, router: RouterConfig | None = None) -> None:
        super().__init__()
        if not 1 <= top_k < experts:
            raise ModelConfigError(f"top_k={top_k} must be in [1, experts={experts})")
        cfg = router or RouterConfig()
        self.experts = experts
        self.top_k = top_k
        self.score = cfg.score
        self.bias_update_rate = cfg.bias_update_rate
        self.gate = nn.Linear(d, experts, bias=False)
        self.bias_balancing = cfg.bias_balancing
        self.last_path: str | None = None  # "fused" (kernels/router.py) or "eager": what the last forward ran
        if cfg.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(experts))
            self.register_buffer("pending_load", torch.zeros(experts), persistent=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.gate(x)  # (T, E); router maths in (at least) fp32, also under autocast
        self.last_path = "eager"
        if fused_router.problem(logits, self.top_k) is None:  # CUDA: kernels/router.py, the same maths
            out = self._fused(logits)
            if out is not None:
                self.last_path = "fused"
                return out
        return self._eager(logits)

    def _fused(self, logits: torch.Tensor) -> RouterOutput | None:
        """The router outputs from kernels/router.py (None if its launch failed: then run eagerly)."""
        bias = self.expert_bias if self.bias_balancing else None
        res = fused_router.fused_router(logits, self.top_k, self.score, bias)
        if res is None:
            return None
        top_w, top_i, counts, load, aux, z = res
        if self.bias_balancing and self.training:
            self.pending_load += counts.to(self.pending_load.dtype)
        return RouterOutput(top_w, top_i, aux, z, load, counts)

    def _eager(self, logits: torch.Tensor) -> RouterOutput:
        """The reference router maths in PyTorch (CPU always; CUDA when the fused router cannot run)."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.score == "softmax":
            scores = logits.softmax(dim=-1)
            importance = scores.mean(dim=0)  # P_i: carries the gradient
        else:
            scores = logits.sigmoid()
            importance = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)  # DeepSeek-V3 normalised affinity
        if not self.bias_balancing:
            top_w, top_i = scores.topk(self.top_k, dim=-1)
        else:  # the bias steers the selection only; the weights are the unbiased scores
            top_i = (scores.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices
            top_w = scores.gather(-1, top_i)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        slots = expert_counts(top_i, self.experts)
        counts = slots.to(scores.dtype)
        if self.bias_balancing and self.training:
            self.pending_load += counts.detach()
        load = counts / counts.sum()  # f_i: no gradient (a count), as in Switch Transformer
        aux = self.experts * (load * importance).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return RouterOutput(top_w, top_i, aux, z, load.detach(), slots)

    def _apply(self, fn: Any, recurse: bool = True) -> Router:
        """Keep the balancing state in fp32 under model.to(bf16)/.half(): a bias step of 1e-3
        would round away in bf16 once the bias is larger than about 0.25."""
        super()._apply(fn, recurse)
        for name in ("expert_bias", "pending_load"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @torch.no_grad()
    def update_bias(self) -> None:
        """One aux-loss-free balancing step from the loads counted since the last call (no-op when
        bias balancing is off or nothing was routed)."""
        if not self.bias_balancing:
            return
        load = self.pending_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        # no host sync: with nothing routed every load is 0, so sign(mean - load) = 0 and the bias stays
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


@dataclass
class Dispatch:
    order: torch.Tensor  # (T*k,) flat (token, slot) index of each permuted row
    inverse: torch.Tensor  # (T*k,) permuted row of each flat (token, slot): order[inverse] = arange
    counts: torch.Tensor  # (E,) rows per expert
    offs: torch.Tensor  # (E,) int32 cumulative row ends (kernels.grouped_mm contract)


def sort_keys(flat: torch.Tensor, experts: int) -> torch.Tensor:
    """The expert ids in the narrowest integer dtype that holds them: a radix sort does one pass per
    key byte (int64 keys took 8 onesweep passes on an H100, uint8 keys take 1). A stable sort's order
    does not depend on the key dtype, so route() gives the same permutation either way."""
    if experts <= 256:
        return flat.to(torch.uint8)
    return flat.to(torch.int16 if experts <= 32768 else torch.int32)


def route(indices: torch.Tensor, experts: int, counts: torch.Tensor | None = None) -> Dispatch:
    """The expert-sorted order of the (token, slot) pairs (a stable sort, so deterministic).

    `counts` (E,) int64 slots per expert, when the caller has them (RouterOutput.counts), saves their
    recount; they must be expert_counts(indices, experts)."""
    flat = indices.reshape(-1)
    counts = expert_counts(flat, experts) if counts is None else counts
    order = torch.argsort(sort_keys(flat, experts), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Dispatch(order, inverse, counts, counts.cumsum(0).to(torch.int32))


def dispatch(x: torch.Tensor, indices: torch.Tensor, experts: int,
             counts: torch.Tensor | None = None) -> tuple[torch.Tensor, Dispatch]:
    """Rows of x repeated once per routed slot and sorted by expert.

    x: (T, d), indices: (T, k), counts: see route. Returns (x_perm (T*k, d), Dispatch).
    """
    d = route(indices, experts, counts)
    return permute(x, d.order, d.inverse, indices.shape[1]), d


def combine(y_perm: torch.Tensor, d: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """Inverse of dispatch: un-permute the expert outputs and sum the k slots with their weights."""
    return unpermute(y_perm, weights, d.order, d.inverse)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: two grouped GEMMs for all experts.

    The gate and up projections are one (E, d, 2f) weight `w13` = [w1 | w3] along its last dim, so
    they are one grouped GEMM of N = 2f (x_perm is read once, and the backward's dx is one GEMM
    over K = 2f instead of two GEMMs and an add); `w1` and `w3` are views of its halves.
    """

    def __init__(self, d: int, f: int, experts: int, backend: str = "auto") -> None:
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ModelConfigError(f"expert backend {backend!r} is not one of {EXPERT_BACKENDS}")
        self.experts = experts
        self.f = f
        self.backend = backend
        self.w13 = nn.Parameter(torch.empty(experts, d, 2 * f))
        self.w2 = nn.Parameter(torch.empty(experts, f, d))
        self.last_backend: str | None = None  # what actually ran (after any fallback)
        self.last_fallback: str | None = None

    @property
    def w1(self) -> torch.Tensor:
        return self.w13[..., : self.f]

    @property
    def w3(self) -> torch.Tensor:
        return self.w13[..., self.f :]

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def fused_plan(self, x: torch.Tensor) -> tuple[str | None, str | None]:
        """For backend "fused": (grouped GEMM backend of its plain products, None) when the fused
        kernels (kernels/moe_fused.py) take x, else (None, why not; None when not requested)."""
        if self.backend != "fused":
            return None, None
        why = moe_fused.problem(x)
        dtype = self._dtype(x)
        if why is None and x.is_cuda and dtype != torch.bfloat16:
            why = f"the fused MoE kernels run in bfloat16 on CUDA, not {dtype}"
        if why is not None:
            return None, f"expert backend 'fused' -> 'auto': {why}"
        if not x.is_cuda:  # Triton's interpreter (tests): its own plain products
            return "triton", None
        probe = x.new_empty(0, x.shape[1], dtype=dtype)
        for plain in ("cutlass", "torch_grouped"):
            if backend_problem(plain, probe, self.w13) is None and backend_problem(
                    plain, probe.new_empty(0, self.f), self.w2) is None:
                return plain, None
        return None, "expert backend 'fused' -> 'auto': neither cutlass nor torch._grouped_mm runs here"

    def fused(self, x: torch.Tensor, d: Dispatch, weights: torch.Tensor, plain: str) -> torch.Tensor:
        """The combined expert outputs y (T, d) from token-major x and the gate weights (T, k), through
        the fused kernels (the combine folded into the down projection unless moe_fused.OPTIONS says
        otherwise)."""
        dt = self._dtype(x)
        k = weights.shape[1]
        y = moe_fused.fused_moe(x.to(dt), self.w13.to(dt), self.w2.to(dt), weights, (d.order // k).to(torch.int32),
                                d.order, d.inverse, d.offs, k, plain)
        why = moe_fused.combine_switch.reason
        self.last_backend, self.last_fallback = f"fused+{plain}", why and f"fused combine -> 'unfused': {why}"
        return y

    def forward(self, x: torch.Tensor, offs: torch.Tensor, why: str | None = None) -> torch.Tensor:
        """The expert outputs of already permuted rows x; `why` is the reason a fused request fell
        back to this path (recorded in last_fallback)."""
        probe = x.new_empty(0, x.shape[1], dtype=self._dtype(x))  # backends are chosen by device, dtype, shape
        b, why_b = resolve_backend("auto" if self.backend == "fused" else self.backend, probe, self.w13)
        if why_b is None:  # w2 (f, d) must suit the same backend, else both use the fallback
            b2, why_b = resolve_backend(b, probe.new_empty(0, self.f), self.w2)
            b = b2 if why_b is not None else b
        self.last_backend, self.last_fallback = b, why or why_b
        h13 = grouped_mm(x, self.w13, offs, b)
        return grouped_mm(swiglu(h13, self.f), self.w2, offs, b)


@dataclass
class MoEOutput:
    y: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    load: torch.Tensor


class MoE(nn.Module):
    def __init__(self, d: int, f: int, experts: int, top_k: int, backend: str = "auto",
                 router: RouterConfig | None = None) -> None:
        super().__init__()
        self.experts_n = experts
        self.top_k = top_k
        self.router = Router(d, experts, top_k, router)
        self.experts = GroupedExperts(d, f, experts, backend)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.router(flat)
        plain, why = self.experts.fused_plan(flat)
        if plain is not None:  # gather, SwiGLU, its backward and the combine fused into the expert GEMMs
            y = self.experts.fused(flat, route(r.indices, self.experts_n, r.counts), r.weights, plain)
        else:
            x_perm, disp = dispatch(flat, r.indices, self.experts_n, r.counts)
            y = combine(self.experts(x_perm, disp.offs, why), disp, r.weights)
        return MoEOutput(y.view(shape), r.aux_loss, r.z_loss, r.load)


# ------------------------------------------------------------------------------------------ model
class SharedExperts(nn.Module):
    """S always-active SwiGLU experts of width f_s, as one SwiGLU of width S f_s (the same function and
    parameters as S separate experts summed, as DeepSeekMoE implements it), optionally scaled by a
    per-token sigmoid gate (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, d: int, f: int, count: int, gate: bool = False) -> None:
        super().__init__()
        self.mlp = SwiGLU(d, f * count)
        self.gate = nn.Linear(d, 1, bias=False) if gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y
