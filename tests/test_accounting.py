"""The equal-resource planner: same N, same C, same U for every run; T scales as 1/N_active."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import TINY

from stages.accounting import PlanError, plan_run, solve_architecture, train_flops
from stages.schema import RunConfig, load_params, parse_params

ROOT = Path(__file__).resolve().parent.parent


def default_and_tiny():
    yield load_params(ROOT / "params.yaml")
    yield parse_params(TINY)
    big = copy.deepcopy(TINY)
    big["model"] = {"d_model": 512, "n_layers": 8, "n_heads": 8, "seq_len": 1024}
    big["budget"] = {"params": 1.2e8, "compute": 6 * 1.2e8 * 2e9, "unique_tokens": 10**9}
    big["runs"] = {"dense": {"kind": "dense"}} | {
        f"moe_r{int(r * 100)}": {"kind": "moe", "activation_rate": r, "top_k": 2} for r in (0.1, 0.2, 0.3, 0.5)
    }
    yield parse_params(big)


@pytest.mark.parametrize("params", list(default_and_tiny()), ids=["default", "tiny", "120M"])
def test_runs_share_the_budget(params) -> None:
    plans = {r: plan_run(params, r) for r in params.runs}
    for name, plan in plans.items():
        arch = plan.arch
        # the same total non-vocab params (within FFN rounding)
        assert abs(arch.nonvocab_total / params.budget.params - 1) < 0.1, (name, arch.nonvocab_total)
        # the same compute, to within one optimizer step
        step_flops = train_flops(arch.nonvocab_active, plan.tokens_per_step)
        assert params.budget.compute - step_flops <= train_flops(arch.nonvocab_active, plan.tokens) \
            <= params.budget.compute
        target = params.runs[name].activation_rate
        if target is not None:
            assert abs(arch.activation_rate / target - 1) < 0.15, (name, arch.activation_rate)
    dense = next(p for p in plans.values() if p.arch.kind == "dense")
    for plan in plans.values():
        # at equal N and C, tokens scale as 1 / r_a (relative to the dense run)
        expected = dense.tokens * dense.arch.nonvocab_active / plan.arch.nonvocab_active
        assert abs(plan.tokens / expected - 1) < 0.02 + plan.tokens_per_step / plan.tokens


def test_120m_scale_hits_the_rate_closely() -> None:
    """With top-2 routing the FFN share moves in steps of 2/E; fine enough below r_a = 0.3."""
    p = list(default_and_tiny())[2]
    for r in (0.1, 0.2, 0.3):
        arch = plan_run(p, f"moe_r{int(r * 100)}").arch
        assert abs(arch.activation_rate - r) < 0.01, (r, arch)
        assert abs(arch.nonvocab_total / 1.2e8 - 1) < 0.01


def test_rate_below_attention_share_is_a_plan_error() -> None:
    p = parse_params(TINY)
    with pytest.raises(PlanError, match="attention and norms"):
        solve_architecture(p.model, RunConfig(kind="moe", activation_rate=0.05), p.budget.params, "x")


def test_explicit_experts_choose_top_k() -> None:
    p = parse_params(TINY)
    arch = solve_architecture(p.model, RunConfig(kind="moe", activation_rate=0.5, experts=8), 30000, "x")
    assert arch.experts == 8 and 1 <= arch.top_k < 8
