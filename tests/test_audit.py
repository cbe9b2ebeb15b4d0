"""The audit: plan vs what ran (module params, loader tokens, flop counter), and the study verdict."""

from __future__ import annotations

import copy

import pytest
from conftest import TINY

from moe_study.accounting import AUDIT_TOLERANCE, plan_run
from moe_study.config.schema import parse_params
from moe_study.model.lm import build_model
from moe_study.train.audit import audit_run, measure_flops_per_token

V = 320


@pytest.fixture(scope="module")
def plans() -> dict:
    p = parse_params(TINY)
    return {r: plan_run(p, r).to_dict() for r in p.runs}


@pytest.mark.parametrize("run", ["dense", "moe_r50"])
def test_a_faithful_run_passes(plans: dict, run: str) -> None:
    plan = plans[run]
    a = audit_run(plan, build_model(plan["arch"], V), plan["tokens"])
    assert set(a) >= {"nonvocab_params", "nonvocab_active", "tokens", "flops_per_token", "max_rel_dev", "ok"}
    for key in ("nonvocab_params", "nonvocab_active", "tokens", "flops_per_token"):
        assert set(a[key]) == {"plan", "actual", "rel_dev"}
    assert a["nonvocab_params"]["actual"] == plan["nonvocab_params"]
    assert a["ok"] and a["max_rel_dev"] < 0.01 and a["tolerance"] == AUDIT_TOLERANCE, a


def test_deviations_are_caught(plans: dict) -> None:
    plan = plans["moe_r50"]
    model = build_model(plan["arch"], V)
    short = audit_run(plan, model, plan["tokens"] - plan["tokens_per_step"] * 2, measure_flops=False)
    assert not short["ok"] and short["tokens"]["rel_dev"] < -0.01
    # a model built from another shape than planned: params and FLOPs both deviate
    other = copy.deepcopy(plan)
    other["arch"]["top_k"] = plan["arch"]["top_k"] - 1
    wrong = audit_run(plan, build_model(other["arch"], V), plan["tokens"])
    assert not wrong["ok"]
    assert wrong["nonvocab_active"]["rel_dev"] < -0.01 and wrong["flops_per_token"]["rel_dev"] < -0.01


def test_measurement_leaves_the_model_and_rng_alone(plans: dict) -> None:
    import torch

    model = build_model(plans["moe_r50"]["arch"], V)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    measure_flops_per_token(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert {m.experts.backend for m in model.modules() if hasattr(m, "router")} == {"auto"}

