"""The dense building blocks of the decoder: RMSNorm, rotary attention (GQA, optional q/k norms), SwiGLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
