"""The decoder LM of the study: dense SwiGLU or top-k routed MoE, in one readable file.

The architecture is fixed by stages/accounting.py (whose formulas the planner uses to equalise
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

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import grouped_mm, moe_fused, resolve_backend
from kernels import router as fused_router
from kernels.grouped_gemm import CHOICES, backend_problem
from kernels.permute import permute, unpermute
from kernels.swiglu import swiglu
from stages.accounting import Architecture
from stages.schema import RouterConfig

INIT_STD = 0.02
# grouped GEMM backends (kernels.grouped_gemm) + "fused": the Triton expert block with the gather, SwiGLU
# and the gate-weighted combine fused into its GEMMs (kernels/moe_fused.py), its plain products on
# cutlass or torch_grouped; "auto" elsewhere
EXPERT_BACKENDS = (*CHOICES, "fused")


class ModelConfigError(ValueError):
    """An arch dict the model cannot be built from (the message names the key)."""


# --------------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq_len, head_dim) for the rotate-half form of RoPE."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, Dh); rotates pairs (i, i + Dh/2) by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention: q (d -> H h), k, v (d -> KV h; GQA when KV < H), o (H h -> d), rotary
    positions, optional q/k/v biases and q/k RMSNorms ("layer": over all q / k features, "head": per head)."""

    def __init__(self, d: int, n_heads: int, seq_len: int, n_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, qk_norm: str = "none") -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.head_dim = d // n_heads if head_dim is None else head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q = nn.Linear(d, q_dim, bias=qkv_bias)
        self.k = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.o = nn.Linear(q_dim, d, bias=False)
        self.qk_norm = qk_norm
        if qk_norm == "layer":
            self.q_norm, self.k_norm = RMSNorm(q_dim), RMSNorm(kv_dim)
        elif qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        cos, sin = rotary_tables(seq_len, self.head_dim)
        # buffers, not parameters (RoPE has none), and not saved: they are a function of the arch
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        if self.cos.shape[0] < S:
            raise ValueError(f"sequence of {S} tokens exceeds the model's seq_len {self.cos.shape[0]}")

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(B, S, n, self.head_dim).transpose(1, 2)

        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.qk_norm == "layer":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = heads(q, self.n_heads), heads(k, self.n_kv_heads), heads(v, self.n_kv_heads)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.cos[:S], self.sin[:S]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # GQA: each kv head serves n_heads / n_kv_heads query heads
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
        why = moe_fused.combine_disabled[0] if moe_fused.combine_disabled else None
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


class Block(nn.Module):
    def __init__(self, a: Architecture, backend: str, layer: int = 0, router: RouterConfig | None = None) -> None:
        super().__init__()
        self.norm1 = RMSNorm(a.d_model)
        self.attn = Attention(a.d_model, a.n_heads, a.seq_len, a.n_kv_heads, a.head_dim, a.qkv_bias, a.qk_norm)
        self.norm2 = RMSNorm(a.d_model)
        moe = a.is_moe_layer(layer)
        self.ffn: nn.Module = (
            MoE(a.d_model, a.ffn_hidden, a.experts, a.top_k, backend, router) if moe
            else SwiGLU(a.d_model, a.dense_width)
        )
        self.shared = (SharedExperts(a.d_model, a.shared_width, a.shared_experts, a.shared_gate)
                       if moe and a.shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput | None]:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        out = self.ffn(h)
        if isinstance(out, MoEOutput):
            y = out.y if self.shared is None else out.y + self.shared(h)
            return x + y, out
        return x + out, None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, V), float32; None when the forward was given targets
    aux_loss: torch.Tensor  # mean over MoE layers (0 for dense)
    z_loss: torch.Tensor  # mean over MoE layers (0 for dense)
    load: torch.Tensor | None  # (layers, E) fraction of routed slots per expert, MoE only
    ce: torch.Tensor | None = None  # mean next-token cross-entropy, when the forward was given targets


class LM(nn.Module):
    def __init__(self, arch: Architecture, vocab_size: int, expert_backend: str = "auto",
                 router: RouterConfig | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.router_config = router or RouterConfig()
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, arch.d_model)
        self.blocks = nn.ModuleList(Block(arch, expert_backend, i, router) for i in range(arch.n_layers))
        self.norm = RMSNorm(arch.d_model)
        # Tied: the LM head is the embedding matrix (no extra module, so no shared-tensor aliasing)
        self.lm_head = None if arch.tie_embeddings else nn.Linear(arch.d_model, vocab_size, bias=False)
        self._compiled_head_loss: Any = None  # set by compile_head
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); output projections of residual branches scaled by 1/sqrt(2L)."""
        resid = INIT_STD / math.sqrt(2 * self.arch.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()  # q/k/v biases
            elif p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            elif name.endswith(("attn.o.weight", "ffn.w2.weight", "experts.w2", "shared.mlp.w2.weight")):
                p.normal_(0.0, resid)
            else:
                p.normal_(0.0, INIT_STD)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """Logits of `idx` (B, S); given `targets` (B, S), the mean cross-entropy `ce` instead of logits."""
        x = self.tok_emb(idx)
        moe: list[MoEOutput] = []
        for block in self.blocks:
            x, m = block(x)
            if m is not None:
                moe.append(m)
        if targets is None:
            logits, ce = self.head(x), None
        else:
            logits, ce = None, (self._compiled_head_loss or self.head_loss)(x, targets)
        zero = (logits if ce is None else ce).new_zeros(())
        if not moe:
            return ModelOutput(logits, zero, zero, None, ce)
        aux = torch.stack([m.aux_loss for m in moe]).mean()
        z = torch.stack([m.z_loss for m in moe]).mean()
        return ModelOutput(logits, aux, z, torch.stack([m.load for m in moe]), ce)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: float32 logits (B, S, V) of the last hidden states."""
        x = self.norm(x)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w).float()

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of `head(x)` against `targets` (B, S): the training loss.

        Eager, these are exactly the ops of `F.cross_entropy(model(idx).logits, ...)` (same bytes on
        CPU). Compiled (`compile_head`), Inductor fuses the float32 upcast into the log-softmax and its
        backward, so the (B*S, V) float32 logits and their gradient are never materialised.
        """
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def compile_head(self, mode: str | None = None) -> None:
        """Use a torch.compile'd `head_loss` in `forward(idx, targets)` (no parameter or state_dict change)."""
        self._compiled_head_loss = torch.compile(self.head_loss, mode=mode)

    def update_router_bias(self) -> None:
        """Aux-loss-free balancing step of every MoE router (RouterConfig.bias_balancing); call it once
        after each optimizer step. A no-op for dense models and routers without bias balancing."""
        for m in self.modules():
            if isinstance(m, Router):
                m.update_bias()

    def expert_backends(self) -> dict[str, str | None]:
        """Backend that ran in the last forward of each MoE layer, and the fallback reason if any."""
        out: dict[str, str | None] = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoE):
                out[f"layer{i}"] = block.ffn.experts.last_backend
                out[f"layer{i}.fallback"] = block.ffn.experts.last_fallback
        return out


# ------------------------------------------------------------------------------- build, count, load
ARCH_KEYS = tuple(f.name for f in fields(Architecture))


def architecture(arch: dict[str, Any]) -> Architecture:
    """Validate a plan's "arch" dict into an Architecture (unknown or missing keys are errors)."""
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ModelConfigError(f"arch has unknown key(s) {unknown}; expected {list(ARCH_KEYS)}")
    try:
        a = Architecture(**arch)
    except TypeError as err:
        raise ModelConfigError(f"arch is incomplete: {err}") from None
    if a.kind not in ("dense", "moe"):
        raise ModelConfigError(f"arch.kind={a.kind!r} must be 'dense' or 'moe'")
    for key in ("d_model", "n_layers", "n_heads", "seq_len", "ffn_hidden", "experts", "top_k", "moe_every",
                "n_kv_heads", "head_dim", "shared_ffn_hidden", "dense_ffn_hidden"):
        value = getattr(a, key)
        if value is not None and int(value) < 1:
            raise ModelConfigError(f"arch.{key}={value} must be positive")
    if a.head_dim is None and a.d_model % a.n_heads or a.head_size % 2:
        raise ModelConfigError(
            f"arch.d_model={a.d_model} / n_heads={a.n_heads} must give an even head size (rotary pairs)")
    if a.n_heads % a.kv_heads:
        raise ModelConfigError(f"arch.n_heads={a.n_heads} is not divisible by n_kv_heads={a.n_kv_heads}")
    if a.mla:
        raise ModelConfigError("arch.kv_lora_rank: multi-head latent attention is counted by stages/accounting.py "
                               "but not built by this model")
    if a.qk_norm not in ("none", "layer", "head"):
        raise ModelConfigError(f"arch.qk_norm={a.qk_norm!r} must be none, layer or head")
    if a.shared_experts < 0 or a.first_dense_layers < 0:
        raise ModelConfigError("arch.shared_experts and arch.first_dense_layers must be >= 0")
    if a.kind == "moe" and not 1 <= a.top_k < a.experts:
        raise ModelConfigError(f"arch.top_k={a.top_k} must be in [1, experts={a.experts})")
    if a.kind == "moe" and a.moe_layers == 0:
        raise ModelConfigError(f"arch.first_dense_layers={a.first_dense_layers} / moe_every={a.moe_every} leave "
                               f"no MoE layer in {a.n_layers} layers")
    return a


def router_config(router: RouterConfig | dict[str, Any] | None) -> RouterConfig | None:
    """A RouterConfig from the params section, its dict form (config.json), or None (the default)."""
    if router is None or isinstance(router, RouterConfig):
        return router
    try:
        return RouterConfig(**router)
    except Exception as err:
        raise ModelConfigError(f"bad router config {router!r}: {err}") from None


def build_model(arch: dict[str, Any] | Architecture, vocab_size: int, expert_backend: str = "auto",
                router: RouterConfig | dict[str, Any] | None = None) -> LM:
    """The LM of a plan's "arch" dict (keys of accounting.Architecture) and the tokenizer's vocab.

    `router` (params.yaml `router:`; None = softmax top-k) only matters for MoE archs. Save it in
    the checkpoint's config.json under "router" so `load_model` rebuilds the same routing.
    """
    a = arch if isinstance(arch, Architecture) else architecture(arch)
    if vocab_size < 2:
        raise ModelConfigError(f"vocab_size={vocab_size} must be at least 2")
    return LM(a, int(vocab_size), expert_backend, router_config(router))


def count_nonvocab_params(model: LM) -> tuple[int, int]:
    """(total, active) non-vocabulary parameters of the real module.

    Total: every parameter except the token embedding and an untied LM head. Active: the same,
    but each MoE layer's experts count k/E of their parameters (a token uses k of E experts).
    """
    vocab = {id(model.tok_emb.weight)} | ({id(model.lm_head.weight)} if model.lm_head is not None else set())
    total = sum(p.numel() for p in model.parameters() if id(p) not in vocab)
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            expert_params = sum(p.numel() for p in m.experts.parameters())
            inactive += expert_params * (m.experts_n - m.top_k) // m.experts_n
    return total, total - inactive


MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def state_dict_for_save(model: LM) -> dict[str, torch.Tensor]:
    """Contiguous CPU float tensors in a fixed key order (so identical weights give identical bytes)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in sorted(model.state_dict().items())}


def save_model(model: LM, directory: Path, config: dict[str, Any]) -> None:
    """Write model.safetensors and config.json into `directory` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_save(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def load_model(directory: Path | str, expert_backend: str = "auto",
               device: str | torch.device = "cpu") -> tuple[LM, dict[str, Any]]:
    """Rebuild the model from config.json and load its weights (strict: every key must match)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_FILE, directory / MODEL_FILE
    if not cfg_path.exists() or not weights.exists():
        raise FileNotFoundError(f"{directory}: needs {CONFIG_FILE} and {MODEL_FILE} (run the train stage)")
    config = json.loads(cfg_path.read_text())
    for key in ("arch", "vocab_size"):
        if key not in config:
            raise ModelConfigError(f"{cfg_path}: missing key {key!r}")
    model = build_model(config["arch"], config["vocab_size"], expert_backend, config.get("router"))
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelConfigError(f"{weights}: weights do not match config.json (missing {missing}, "
                               f"unexpected {unexpected})")
    return model.to(device), config
