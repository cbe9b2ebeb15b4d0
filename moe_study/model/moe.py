"""The MoE feed-forward block: a Router, the routed GroupedExperts, and optional SharedExperts.

Three swappable parts, as torchtitan keeps them: the router (router.py, its balancing losses in
balancing.py) picks k experts per token; `GroupedExperts` holds the E experts' stacked weights and
hands them to kernels/experts.py, which owns dispatch, the expert GEMMs (backend choice and
fallback) and the combine, since the fused kernels do all three at once; `SharedExperts` are
always-active experts added by the decoder block. Dropless: no capacity factor, no token is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.experts import EXPERT_BACKENDS, expert_forward
from moe_study.config.schema import RouterConfig
from moe_study.model.layers import ModelConfigError, SwiGLU
from moe_study.model.router import Router

__all__ = ["EXPERT_BACKENDS", "GroupedExperts", "MoE", "MoEOutput", "SharedExperts"]


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: two grouped GEMMs for all experts (kernels/experts.py).

    The gate and up projections are one (E, d, 2f) weight `w13` = [w1 | w3] along its last dim, so
    they are one grouped GEMM of N = 2f (x_perm is read once, and the backward's dx is one GEMM
    over K = 2f instead of two GEMMs and an add); `w1` and `w3` are views of its halves.
    `backend` is one of EXPERT_BACKENDS (settable, e.g. the FLOP audit forces "reference");
    `last_backend` / `last_fallback` record what the last forward ran and why it differs.
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

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """y (T, d): the gate-weighted sum of each token's k experts, from token-major x (T, d) and the
        router's weights, indices (T, k) and per-expert counts (E,) (None: recounted)."""
        res = expert_forward(x, weights, indices, counts, self.w13, self.w2, self.backend)
        self.last_backend, self.last_fallback = res.backend_used, res.fallback_reason
        return res.y


@dataclass
class MoEOutput:
    y: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    load: torch.Tensor


class MoE(nn.Module):
    """Top-k routed SwiGLU experts in place of the dense FFN (the shared experts live in the block)."""

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
        y = self.experts(flat, r.weights, r.indices, r.counts)
        return MoEOutput(y.view(shape), r.aux_loss, r.z_loss, r.load)


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
