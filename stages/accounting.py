"""The accounting formulas of the equal-resource study, in one place.

Conventions of arXiv 2506.12119: N counts non-vocabulary parameters (token embedding and LM head
excluded); the activation rate is r_a = N_active / N; training compute is C = 6 * N_active * T, so
at equal N and C an MoE run consumes about 1/r_a times the dense run's tokens, which come from
re-reading the same unique data (more epochs), never from new data.

The model (stages/model.py) is a pre-norm decoder with RMSNorm (weight only), bias-free attention
(q, k, v, o: 4 d^2) with rotary positions (no parameters), and SwiGLU FFNs (3 d f). An MoE layer
replaces the FFN by E SwiGLU experts of width f_e, top-k routed by a bias-free linear router (d E).
`tests/test_accounting.py` checks these counts against the real module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from stages.schema import ModelConfig, Params, RunConfig


def attention_params(d: int) -> int:
    return 4 * d * d


def swiglu_params(d: int, f: int) -> int:
    return 3 * d * f


def norm_params(d: int) -> int:
    return d


def shared_params(m: ModelConfig) -> int:
    """Non-vocab params every run has regardless of its FFN: attention and norms."""
    per_layer = attention_params(m.d_model) + 2 * norm_params(m.d_model)
    return m.n_layers * per_layer + norm_params(m.d_model)  # + final norm


def vocab_params(m: ModelConfig, vocab_size: int) -> int:
    emb = vocab_size * m.d_model
    return emb if m.tie_embeddings else 2 * emb


def train_flops(n_active: float, tokens: float) -> float:
    """C = 6 N_active T (forward 2, backward 4 FLOPs per active parameter per token)."""
    return 6.0 * n_active * tokens


def tokens_for_compute(n_active: float, compute: float) -> float:
    return compute / (6.0 * n_active)


@dataclass(frozen=True)
class Architecture:
    kind: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    ffn_hidden: int  # dense: the FFN width; moe: the width of one expert
    experts: int = 1
    top_k: int = 1
    tie_embeddings: bool = True

    @property
    def nonvocab_total(self) -> int:
        return self._count(self.experts)

    @property
    def nonvocab_active(self) -> int:
        return self._count(self.top_k)

    @property
    def activation_rate(self) -> float:
        return self.nonvocab_active / self.nonvocab_total

    def _count(self, experts_counted: int) -> int:
        d = self.d_model
        ffn = experts_counted * swiglu_params(d, self.ffn_hidden)
        router = d * self.experts if self.kind == "moe" else 0
        per_layer = attention_params(d) + 2 * norm_params(d) + ffn + router
        return self.n_layers * per_layer + norm_params(d)

    def to_dict(self) -> dict:
        return asdict(self)


class PlanError(ValueError):
    """A run that cannot meet the budget with the model family (names the run and the reason)."""


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def solve_architecture(m: ModelConfig, run: RunConfig, target_params: float, name: str = "run") -> Architecture:
    """Pick FFN widths so that N matches the budget (and r_a the run's target, for MoE)."""
    base = dict(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, seq_len=m.seq_len,
                tie_embeddings=m.tie_embeddings)
    shared = shared_params(m)
    ffn_budget = target_params - shared  # over all layers, routers included for MoE
    if ffn_budget <= 0:
        raise PlanError(
            f"runs.{name}: budget.params={target_params:.4g} is below the {shared} params that attention "
            f"and norms of the model family alone take (lower model.d_model / n_layers or raise the budget)"
        )
    d, L = m.d_model, m.n_layers
    if run.kind == "dense":
        f = _round_to(ffn_budget / (L * 3 * d), m.multiple_of)
        return Architecture(kind="dense", ffn_hidden=f, **base)

    k = run.top_k
    if run.activation_rate is not None:
        active_ffn = run.activation_rate * target_params - shared
        if active_ffn <= 0:
            raise PlanError(
                f"runs.{name}.activation_rate={run.activation_rate}: at budget.params={target_params:.4g} the "
                f"attention and norms alone are {shared / target_params:.3f} of N, so the rate must exceed that"
            )
        ratio = active_ffn / ffn_budget  # fraction of FFN params active = k / E
        experts = run.experts or max(k + 1, round(k / ratio))
        if run.experts is not None:
            k = max(1, min(experts - 1, round(ratio * experts)))
    else:
        experts = run.experts
    assert experts is not None
    if k >= experts:
        raise PlanError(f"runs.{name}: top_k={k} must be below experts={experts}")
    # Widths are rounded to model.multiple_of, so search the expert counts near the estimate for
    # the one whose rounded architecture lands closest to the budget (N) and the target rate.
    target_rate = run.activation_rate
    best: tuple[float, Architecture] | None = None
    candidates = [experts] if run.experts is not None else range(max(k + 1, experts - 3), experts + 4)
    for e in candidates:
        f_e = _round_to((ffn_budget / L - d * e) / (e * 3 * d), m.multiple_of)
        arch = Architecture(kind="moe", ffn_hidden=f_e, experts=e, top_k=k, **base)
        err = abs(arch.nonvocab_total / target_params - 1)
        if target_rate is not None:
            err += abs(arch.activation_rate / target_rate - 1)
        if best is None or err < best[0]:
            best = (err, arch)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class RunPlan:
    run: str
    arch: Architecture
    tokens: int  # the run's training token budget T
    batch_size: int  # sequences per step
    steps: int
    unique_tokens: int
    compute: float

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.arch.seq_len

    @property
    def epochs(self) -> float:
        return self.tokens / self.unique_tokens

    def to_dict(self) -> dict:
        a = self.arch
        return {
            "run": self.run,
            "arch": a.to_dict(),
            "nonvocab_params": a.nonvocab_total,
            "nonvocab_active": a.nonvocab_active,
            "activation_rate": a.activation_rate,
            "tokens": self.tokens,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "tokens_per_step": self.tokens_per_step,
            "unique_tokens": self.unique_tokens,
            "epochs": self.epochs,
            "compute": self.compute,
            "compute_used": train_flops(a.nonvocab_active, self.tokens),
        }


def plan_run(p: Params, name: str) -> RunPlan:
    """Equal resources: the same N, C and U for every run; T = C / (6 N_active)."""
    arch = solve_architecture(p.model, p.run(name), p.budget.params, name)
    per_step = p.train.batch_size * arch.seq_len
    steps = max(1, math.floor(tokens_for_compute(arch.nonvocab_active, p.budget.compute) / per_step))
    return RunPlan(run=name, arch=arch, tokens=steps * per_step, batch_size=p.train.batch_size, steps=steps,
                   unique_tokens=p.budget.unique_tokens, compute=p.budget.compute)


def check_feasible(p: Params) -> None:
    """Raise PlanError for the first run the budget cannot plan (called before any compute)."""
    for name in p.runs:
        plan_run(p, name)
