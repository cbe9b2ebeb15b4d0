"""The MoE router: which k of the E experts each token goes to, with what weight.

Kept apart from the experts (as torchtitan does) because the study varies the routing (softmax or
sigmoid scores, aux-loss-free bias balancing) while the experts stay the same; the balancing maths
itself lives in balancing.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels import router as fused_router
from kernels.experts import expert_counts
from moe_study.config.schema import RouterConfig
from moe_study.model import balancing
from moe_study.model.layers import ModelConfigError


@dataclass
class RouterOutput:
    weights: torch.Tensor  # (T, k) top-k scores (renormalised to sum 1 with normalize_topk)
    indices: torch.Tensor  # (T, k) expert ids
    aux_loss: torch.Tensor  # scalar, E * sum_i f_i P_i (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)^2
    load: torch.Tensor  # (E,) fraction of the T*k routed slots that went to each expert
    counts: torch.Tensor | None = None  # (E,) int64 routed slots per expert (the dispatch reuses them)


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest scores of each row. Top-1 on CUDA is the row max: the same
    element, ties to the lowest expert id (as the fused router's kernels), and under torch.compile a
    reduction Inductor fuses with the softmax instead of a separate float top-k kernel (gatherTopK, ~1 ms
    of a 21 ms graphed r_a 0.1 step on an H200: results/perf/study_step_h200.md). Not on CPU: there
    topk breaks ties at other ids than max does, and CPU runs must stay byte-identical."""
    if k == 1 and scores.is_cuda:
        return scores.max(dim=-1, keepdim=True)
    return scores.topk(k, dim=-1)


class Router(nn.Module):
    """Bias-free linear gate, top-k over softmax or sigmoid scores, the gate weights (the raw top-k
    scores, or renormalised to sum to 1 with RouterConfig.normalize_topk), and the balancing losses;
    optionally DeepSeek-V3's aux-loss-free bias balancing.

    Bias balancing: `expert_bias` (a buffer: saved with the model, never touched by the optimizer)
    is added to the scores for choosing the top-k experts only; the gate weights are the unbiased
    scores. Each training forward adds its per-expert slot counts to `pending_load`; after the
    optimizer step `update_bias()` moves every bias by rate * sign(mean load - load) (all-reduced
    over data-parallel ranks when torch.distributed is up) and clears the counts, so an overloaded
    expert gets picked less and an idle one more, without a gradient that fights the LM loss.

    On CUDA the maths after the gate GEMM runs in the Triton kernels of kernels/router.py (two launches
    forward, one backward, deterministic; ties in the top-k go to the lowest expert id), unless
    kernels.router.OPTIONS["router"] is "eager"; `_eager` is the reference and what CPU runs. Both
    return the per-expert slot counts, which the dispatch reuses. `last_path` says which one ran.
    """

    def __init__(self, d: int, experts: int, top_k: int, router: RouterConfig | None = None) -> None:
        super().__init__()
        if not 1 <= top_k < experts:
            raise ModelConfigError(f"top_k={top_k} must be in [1, experts={experts})")
        cfg = router or RouterConfig()
        self.experts = experts
        self.top_k = top_k
        self.score = cfg.score
        self.normalize_topk = cfg.normalize_topk
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
        res = fused_router.fused_router(logits, self.top_k, self.score, bias, normalize=self.normalize_topk)
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
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        importance = balancing.importance(scores, self.score)  # P_i: carries the gradient
        if not self.bias_balancing:
            top_w, top_i = _topk(scores, self.top_k)
        else:  # the bias steers the selection only; the weights are the unbiased scores
            top_i = _topk(scores.detach() + self.expert_bias, self.top_k)[1]
            top_w = scores.gather(-1, top_i)
        if self.normalize_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        slots = expert_counts(top_i, self.experts)
        counts = slots.to(scores.dtype)
        if self.bias_balancing and self.training:
            self.pending_load += counts.detach()
        load = balancing.load_fraction(counts)
        aux = balancing.load_balancing_loss(load, importance, self.experts)
        z = balancing.router_z_loss(logits)
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
        balancing.bias_step(self.expert_bias, load, self.bias_update_rate)
        load.zero_()
