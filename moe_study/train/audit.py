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
  On CPU attention runs through the math SDPA kernel while measuring, because torch's counter has
  no formula for the fused CPU kernel (it would count 0 for attention); on GPU the fused kernels
  are counted directly. MoE layers use the reference expert backend while measuring, whose per-expert
  matmuls the counter sees.

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


@contextlib.contextmanager
def _countable(model: LM) -> Iterator[None]:
    """Kernels the flop counter can see: math SDPA on CPU, the reference expert backend."""
    experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
    saved = [e.backend for e in experts]
    for e in experts:
        e.backend = "reference"
    device = next(model.parameters()).device
    ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    try:
        with ctx:
            yield
    finally:
        for e, b in zip(experts, saved, strict=True):
            e.backend = b


def measure_flops_per_token(model: LM, batch_size: int = 2, seed: int = 0) -> float:
    """Training FLOPs per token of one forward + backward, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    seq = model.arch.seq_len
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # its own generator: the global RNG state is left alone
    batch = torch.randint(0, model.vocab_size, (batch_size, seq + 1), generator=gen).to(device)
    was_training = model.training
    model.train()
    try:
        with _countable(model), FlopCounterMode(display=False) as counter:
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

