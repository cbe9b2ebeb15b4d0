"""Audit of a trained run: what the plan promised against what ran.

Three independent measurements of the equal-resource contract, each against the plan:
- parameters: counted on the instantiated torch module (`model.count_nonvocab_params`), total and
  active, against the planner's formula (plan.json `nonvocab_params` / `nonvocab_active`);
- tokens: counted by the loader (`tokens_served`) against the plan's token budget T_i;
- FLOPs per token: measured once with `torch.utils.flop_counter.FlopCounterMode` on one forward +
  backward of the trained model (cross-entropy on a random batch of the run's shape), against the
  accounting formula `Architecture.train_flops_per_token("exact", V)` with the model's vocabulary.
  Both sides count matmuls only (2 FLOPs per multiply-add): the projections, experts, router, LM
  head and attention's QK^T / AV over the full S x S scores; not norms, activations or softmax.
  The flop counter sees routed experts exactly (dropless: T k rows, however the router balances).
  Attention runs through whatever SDPA kernel the device picks (math, CPU flash, CUDA flash,
  memory-efficient, cuDNN) and is counted the same on all of them (`attention_formulas`): forward =
  QK^T + AV over the full S x S scores, backward = 2 x forward, i.e. the plan's convention. Without
  that, torch's registered formulas made the count depend on the kernel: its fused-kernel backward
  also counts the recomputation of QK^T (5 score-sized matmuls where the math kernel's autograd runs
  4), so an H200 audit read 2 L S H h FLOPs/token more than the plan (2,048 in studies/gpu_smoke.yaml:
  0.81% dense, 1.25% MoE) while the CPU audit (math kernel) read 0.000%; and it has no formula at
  all for the CPU flash kernel (it would count attention as 0). MoE layers use the reference expert
  backend while measuring, whose per-expert matmuls the counter sees.

`audit_run` gives train.json its "audit" key and is the one place that decides `ok` (every deviation
within accounting.AUDIT_TOLERANCE); the aggregate stage marks a study failed when any run's audit is
not ok, taking that decision as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from moe_study.accounting import AUDIT_TOLERANCE, Architecture
from moe_study.model.lm import LM, count_nonvocab_params
from moe_study.model.moe import MoE


def rel_dev(plan: float, actual: float) -> float:
    return (actual - plan) / plan if plan else (0.0 if actual == plan else float("inf"))


def _entry(plan: float, actual: float) -> dict[str, float]:
    return {"plan": plan, "actual": actual, "rel_dev": rel_dev(plan, actual)}


# ------------------------------------------------------------------------- attention, every kernel
_SDPA_OPS = (  # (forward, backward) of the fused SDPA kernels: q, k, v are arguments 0-2 of the forward
    ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),  # CUDA flash
    ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"),
    ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
    ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"),
    ("_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_fused_attention_overrideable_backward"),
)  # and 1-3 of the backward (after grad_out)


def attention_formulas() -> dict[Any, Any]:
    """FlopCounterMode formulas for the fused attention kernels that count them as the plan does.

    The plan (`Architecture.attention_score_flops`, trained x 3) counts attention's QK^T and AV over the
    full S x S scores once forward and twice backward (dQ, dK from dS; dP, dV from dO): the model
    FLOPs convention of the rest of the accounting (backward = 2 x forward, Kaplan; PaLM's model FLOPs,
    which leave out rematerialisation). The math SDPA kernel is counted so by construction (its two bmm
    and their autograd). torch's registered formula for every fused kernel's backward adds a fifth
    score-sized matmul, the kernel's recomputation of QK^T (it keeps no S x S scores): hardware FLOPs,
    not model FLOPs, and the reason an H200 audit read 2 L S H h FLOPs/token more than the plan. And
    torch has no formula for the CPU flash kernel at all (0). Here: forward = torch's own QK^T + AV
    count of the kernel's q, k, v (GQA and nested/varlen batches included); backward = 2 x that
    forward, for every kernel, so the audit is backend-independent and equals the plan's term. Neither
    side counts the causal mask's skipped half (accounting.py: full S x S), so both stay comparable.
    """
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    sdpa_forward = flop_registry[aten._scaled_dot_product_flash_attention]  # torch's QK^T + AV count

    def forward(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return sdpa_forward(query, key, value)

    def backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_val: Any = None,
                 **kwargs: Any) -> int:
        return 2 * sdpa_forward(query, key, value)

    flash_forward = flop_registry[aten._flash_attention_forward]  # the ops below the SDPA ones (compiled
    efficient_forward = flop_registry[aten._efficient_attention_forward]  # graphs may call them)

    def flash_backward(grad_out: Any, query: Any, key: Any, value: Any, out: Any, logsumexp: Any,
                       cum_seq_q: Any, cum_seq_k: Any, max_q: Any, max_k: Any, *args: Any,
                       out_val: Any = None, **kwargs: Any) -> int:
        return 2 * flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k)

    def efficient_backward(grad_out: Any, query: Any, key: Any, value: Any, bias: Any, out: Any,
                           cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any, max_seqlen_k: Any,
                           *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return 2 * efficient_forward(query, key, value, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k)

    # (their forwards keep torch's formula, which is already the QK^T + AV count)
    formulas: dict[Any, Any] = {aten._flash_attention_backward: flash_backward,
                                aten._efficient_attention_backward: efficient_backward}
    for fwd, bwd in _SDPA_OPS:
        if hasattr(aten, fwd) and hasattr(aten, bwd):  # (an op a torch build lacks cannot run either)
            formulas[getattr(aten, fwd)] = forward
            formulas[getattr(aten, bwd)] = backward
    for f in (forward, backward, flash_backward, efficient_backward):
        f._get_raw = True  # type: ignore[attr-defined]  # called with the op's arguments, not shapes
    return formulas


def flop_counter() -> Any:
    """The audit's FlopCounterMode: torch's formulas, attention's as `attention_formulas` has them."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=attention_formulas())


@contextlib.contextmanager
def _countable(model: LM) -> Iterator[None]:
    """Kernels the flop counter can see: the reference expert backend (any SDPA kernel is counted)."""
    experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
    saved = [e.backend for e in experts]
    for e in experts:
        e.backend = "reference"
    try:
        yield
    finally:
        for e, b in zip(experts, saved, strict=True):
            e.backend = b


def measure_flops_per_token(model: LM, batch_size: int = 2, seed: int = 0) -> float:
    """Training FLOPs per token of one forward + backward, counted by FlopCounterMode."""
    seq = model.arch.seq_len
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # its own generator: the global RNG state is left alone
    batch = torch.randint(0, model.vocab_size, (batch_size, seq + 1), generator=gen).to(device)
    was_training = model.training
    model.train()
    try:
        with _countable(model), flop_counter() as counter:
            out = model(batch[:, :-1])
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops() / (batch_size * seq)


def audit_run(plan: dict[str, Any], model: LM, tokens_served: int, *, measure_flops: bool = True) -> dict[str, Any]:
    """Plan vs actual for one trained run (the "audit" key of train.json), `ok` against AUDIT_TOLERANCE."""
    total, active = count_nonvocab_params(model)
    arch = Architecture(**plan["arch"])
    out: dict[str, Any] = {
        "nonvocab_params": _entry(plan["nonvocab_params"], total),
        "nonvocab_active": _entry(plan["nonvocab_active"], active),
        "tokens": _entry(plan["tokens"], tokens_served),
    }
    if measure_flops:
        out["flops_per_token"] = _entry(arch.train_flops_per_token("exact", model.vocab_size),
                                        measure_flops_per_token(model))
    out["max_rel_dev"] = max(abs(v["rel_dev"]) for v in out.values())
    out["tolerance"] = AUDIT_TOLERANCE
    out["ok"] = out["max_rel_dev"] <= AUDIT_TOLERANCE
    out["flops_note"] = ("matmul FLOPs of one forward+backward per token (LM head and full S x S attention "
                         "included) by torch.utils.flop_counter vs moe_study/accounting.py")
    return out

