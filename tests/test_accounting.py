"""The accounting and the equal-resource planner.

Every parameter term is checked twice: by hand here (small architectures whose counts are easy to
write down) and against the real module in tests/test_model.py. The formulas are also checked
against the totals published for five public model families, and the FLOPs formula against
torch's flop counter on the project's own model.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from moe_study.accounting import (
    Architecture,
    ConfigError,
    PlanError,
    count_summary,
    from_hf_config,
    plan_run,
    solve_architecture,
)
from moe_study.config.load import load_params
from moe_study.config.schema import PlannerConfig, RunConfig, parse_params

ROOT = Path(__file__).resolve().parent.parent
HF = ROOT / "tests" / "data" / "hf_configs"


def big_params() -> dict:
    big = copy.deepcopy(TINY)
    big["model"] = {"d_model": 512, "n_layers": 8, "n_heads": 8, "seq_len": 1024}
    big["budget"] = {"params": 1.2e8, "compute": 6 * 1.2e8 * 2e9, "unique_tokens": 10**9}
    free = ["expert_width", "experts", "top_k"]
    big["runs"] = {"dense": {"kind": "dense"}} | {
        f"moe_r{int(r * 100)}": {"kind": "moe", "activation_rate": r, "top_k": 2, "vary": free}
        for r in (0.1, 0.2, 0.3, 0.5)
    }
    return big


def default_tiny_big():
    yield load_params(ROOT / "params.yaml")
    yield parse_params(TINY)
    yield parse_params(big_params())


# --------------------------------------------------------------------------------- the terms
D, L, H = 16, 3, 4  # head size 4


def arch(**kw) -> Architecture:
    base = dict(kind="dense", d_model=D, n_layers=L, n_heads=H, seq_len=8, ffn_hidden=24)
    return Architecture(**(base | kw))


def test_dense_terms_by_hand() -> None:
    a = arch()
    per_layer = 4 * D * D + 3 * D * 24 + 2 * D
    assert a.nonvocab_total == a.nonvocab_active == L * per_layer + D


def test_gqa_bias_and_qk_norm_terms() -> None:
    kv = 2 * (D // H)  # 2 kv heads of size 4
    base = arch().nonvocab_total
    assert arch(n_kv_heads=2).nonvocab_total == base - L * 2 * D * (D - kv)
    assert arch(qkv_bias=True).nonvocab_total == base + L * (D + 2 * D)
    assert arch(n_kv_heads=2, qkv_bias=True).nonvocab_total == base - L * 2 * D * (D - kv) + L * (D + 2 * kv)
    assert arch(qk_norm="layer").nonvocab_total == base + L * 2 * D
    assert arch(n_kv_heads=2, qk_norm="layer").nonvocab_total == arch(n_kv_heads=2).nonvocab_total + L * (D + kv)
    assert arch(qk_norm="head").nonvocab_total == base + L * 2 * (D // H)
    assert arch(head_dim=8).nonvocab_total == base + L * 4 * D * (H * 8 - D)


def test_moe_terms_by_hand() -> None:
    E, k, f = 6, 2, 10
    a = arch(kind="moe", experts=E, top_k=k, ffn_hidden=f)
    attn_norms = L * (4 * D * D + 2 * D) + D
    assert a.nonvocab_total == attn_norms + L * (E * 3 * D * f + D * E)
    assert a.nonvocab_active == attn_norms + L * (k * 3 * D * f + D * E)  # the router is always active
    # shared experts: always active, width defaults to the routed width; an optional gate (d params)
    s = arch(kind="moe", experts=E, top_k=k, ffn_hidden=f, shared_experts=2, shared_gate=True)
    assert s.nonvocab_total - a.nonvocab_total == s.nonvocab_active - a.nonvocab_active == L * (2 * 3 * D * f + D)
    w = arch(kind="moe", experts=E, top_k=k, ffn_hidden=f, shared_experts=1, shared_ffn_hidden=40)
    assert w.nonvocab_total - a.nonvocab_total == L * 3 * D * 40


def test_dense_first_and_moe_every_terms() -> None:
    E, k, f, fd = 4, 1, 8, 30
    kw = dict(kind="moe", n_layers=5, experts=E, top_k=k, ffn_hidden=f, dense_ffn_hidden=fd)
    first = arch(**kw, first_dense_layers=2)
    assert [first.is_moe_layer(i) for i in range(5)] == [False, False, True, True, True]
    every = arch(**kw, moe_every=2)
    assert [every.is_moe_layer(i) for i in range(5)] == [False, True, False, True, False]
    attn_norms = 5 * (4 * D * D + 2 * D) + D
    moe_layer = E * 3 * D * f + D * E
    assert first.nonvocab_total == attn_norms + 2 * 3 * D * fd + 3 * moe_layer
    assert every.nonvocab_total == attn_norms + 3 * 3 * D * fd + 2 * moe_layer
    assert every.nonvocab_active == attn_norms + 3 * 3 * D * fd + 2 * (k * 3 * D * f + D * E)


def test_embedding_conventions() -> None:
    V = 100
    tied, untied = arch(), arch(tie_embeddings=False)
    assert tied.total_params(V) == tied.nonvocab_total  # the study's N: no embeddings
    assert tied.total_params(V, "with_embeddings") == tied.nonvocab_total + V * D
    assert untied.total_params(V, "with_embeddings") == untied.nonvocab_total + 2 * V * D
    m = arch(kind="moe", experts=4, top_k=1, ffn_hidden=8)
    assert m.active_params(V, "with_embeddings") == m.nonvocab_active + V * D  # embeddings count as active
    with pytest.raises(ValueError, match="count_embeddings"):
        m.total_params(V, "all")
    # without the input embedding (DeepSeek's activated count) the LM head stays, tied or not
    for a in (tied, untied):
        assert count_summary(a, V)["active_params_no_input_embedding"] == a.nonvocab_active + V * D


def test_flops_terms_and_conventions() -> None:
    V, S = 100, 8
    a = arch(kind="moe", experts=4, top_k=2, ffn_hidden=8, n_kv_heads=2, qkv_bias=True, qk_norm="layer",
             shared_experts=1, shared_gate=True)
    kv = 2 * (D // H)
    attn_mm = D * D + 2 * D * kv + D * D  # biases and norms are not matmuls
    ffn_mm = 2 * 3 * D * 8 + 3 * D * 8 + D * 4 + D  # k experts, shared, router, gate
    assert a.active_matmul_params() == L * (attn_mm + ffn_mm)
    assert a.forward_flops() == 2 * L * (attn_mm + ffn_mm) + 4 * L * S * D
    assert a.train_flops_per_token("exact", V) == 3 * (a.forward_flops() + 2 * D * V)
    assert a.train_flops_per_token("nonvocab") == 3 * a.forward_flops()
    assert a.train_flops_per_token("6n") == 6 * a.nonvocab_active
    with pytest.raises(ValueError, match="vocabulary"):
        a.train_flops_per_token("exact")


@pytest.mark.parametrize("name", ["dense", "moe_gqa_shared", "moe_dense_first_every2"])
def test_flops_match_torch_flop_counter(name: str) -> None:
    """The formula against FlopCounterMode on the real module (within 2%; the two count the same matmuls)."""
    from moe_study.model.lm import build_model
    from moe_study.train.audit import measure_flops_per_token

    archs = {
        "dense": Architecture(kind="dense", d_model=64, n_layers=2, n_heads=4, seq_len=128, ffn_hidden=176),
        "moe_gqa_shared": Architecture(kind="moe", d_model=32, n_layers=2, n_heads=4, seq_len=64, ffn_hidden=16,
                                       experts=8, top_k=2, n_kv_heads=2, qkv_bias=True, qk_norm="head",
                                       shared_experts=1, shared_gate=True, tie_embeddings=False),
        "moe_dense_first_every2": Architecture(kind="moe", d_model=32, n_layers=4, n_heads=2, seq_len=32,
                                               ffn_hidden=12, experts=5, top_k=3, first_dense_layers=1,
                                               moe_every=2, dense_ffn_hidden=64, qk_norm="layer"),
    }
    a, V = archs[name], 211
    measured = measure_flops_per_token(build_model(a, V))
    formula = a.train_flops_per_token("exact", V)
    assert abs(measured / formula - 1) < 0.02, (measured, formula)


def test_flops_of_the_default_study_match_the_flop_counter() -> None:
    from moe_study.model.lm import build_model
    from moe_study.train.audit import measure_flops_per_token

    p = load_params(ROOT / "params.yaml")
    for run in ("dense_s0", "moe_r25_s0"):
        a = plan_run(p, run).arch
        measured = measure_flops_per_token(build_model(a, p.tokenizer.vocab_size))
        assert abs(measured / a.train_flops_per_token("exact", p.tokenizer.vocab_size) - 1) < 0.02


# ------------------------------------------------------------------------ published counts
PUBLISHED = {  # file: (total, active), as published (see tests/data/hf_configs/README.md)
    "llama-2-7b-hf.json": (6.74e9, 6.74e9),
    "mixtral-8x7b-v0.1.json": (46.7e9, 12.9e9),
    "qwen1.5-moe-a2.7b.json": (14.3e9, 2.7e9),
    "deepseek-moe-16b-base.json": (16.4e9, 2.8e9),
    "olmoe-1b-7b-0924.json": (6.9e9, 1.3e9),
}


def agrees(ours: float, published: float) -> bool:
    """Within 0.5%, or within half a unit of the published number's last digit (2.8B: +-0.05B)."""
    digits = len(f"{published / 1e9:g}".split(".")[1]) if "." in f"{published / 1e9:g}" else 0
    half_unit = 0.5 * 10.0 ** -digits * 1e9
    return abs(ours / published - 1) <= 0.005 or abs(ours - published) <= half_unit


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts(name: str) -> None:
    a, vocab = from_hf_config(json.loads((HF / name).read_text()))
    s = count_summary(a, vocab)
    total, active = PUBLISHED[name]
    assert agrees(s["total_params"], total), (s["total_params"], total)
    assert agrees(s["active_params"], active), (s["active_params"], active)
    assert abs(s["total_params"] / total - 1) <= 0.005  # every published total is met to 0.5%


def test_published_counts_that_need_no_rounding_slack() -> None:
    """Four of the five active counts are met to 0.5% outright (DeepSeek-MoE's and OLMoE's use the rule)."""
    for name in ("llama-2-7b-hf.json", "mixtral-8x7b-v0.1.json", "qwen1.5-moe-a2.7b.json"):
        a, vocab = from_hf_config(json.loads((HF / name).read_text()))
        assert abs(a.active_params(vocab, "with_embeddings") / PUBLISHED[name][1] - 1) <= 0.005, name


def test_mla_families_count_like_their_papers() -> None:
    """Bonus: DeepSeek-V2-Lite (15.7B total) and DeepSeek-V3 (671B total, 37B activated per token,
    counted without the input embedding as DeepSeek reports it); MLA is counted, not built."""
    from moe_study.model.layers import ModelConfigError
    from moe_study.model.lm import build_model

    lite, v = from_hf_config(json.loads((HF / "deepseek-v2-lite.json").read_text()))
    assert abs(lite.total_params(v, "with_embeddings") / 15.7e9 - 1) <= 0.005
    v3, v = from_hf_config(json.loads((HF / "deepseek-v3.json").read_text()))
    s = count_summary(v3, v)
    assert abs(s["total_params"] / 671e9 - 1) <= 0.005
    assert agrees(s["active_params_no_input_embedding"], 37e9)
    # MLA attention by hand: q (d -> q_lora -> H (nope + rope)), kv (d -> kv_lora + rope, kv_lora -> H (nope + v)), o
    d, H = 7168, 128
    mm = d * 1536 + 1536 * H * 192 + d * (512 + 64) + 512 * H * 256 + H * 128 * d
    assert v3.attention_matmul_params() == mm and v3.attention_params() == mm + 1536 + 512
    assert v3.attention_score_flops(1) == 2 * 61 * H * (128 + 64 + 128)
    with pytest.raises(ModelConfigError, match="latent attention"):
        build_model(arch(kv_lora_rank=8, qk_rope_head_dim=2).to_dict(), 10)


def test_agreement_rule_can_fail() -> None:
    assert not agrees(2.9e9, 2.8e9) and not agrees(46.0e9, 46.7e9) and agrees(2.84e9, 2.8e9)


def test_count_cli_prints_one_json_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stages.plan", "count", str(HF / "mixtral-8x7b-v0.1.json")],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert {"total_params", "active_params", "flops_per_token"} <= set(d)
    assert d["total_params"] == 46_702_792_704 and d["active_params"] == 12_879_925_248
    # the project's own model/config.json ({"arch", "vocab_size"}, written by train)
    own = tmp_path / "config.json"
    a = arch(kind="moe", experts=4, top_k=1, ffn_hidden=8)
    own.write_text(json.dumps({"arch": a.to_dict(), "vocab_size": 50}))
    d = json.loads(subprocess.run([sys.executable, "-m", "stages.plan", "count", str(own)], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout)
    assert d["nonvocab_params"] == a.nonvocab_total and d["total_params"] == a.nonvocab_total + 50 * D
    short = json.loads(subprocess.run([sys.executable, "-m", "stages.plan", "count", str(own), "--seq-len", "4"],
                                      cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert short["flops_per_token"] == a.train_flops_per_token("exact", 50) - 3 * 4 * L * (8 - 4) * D
    bad = subprocess.run([sys.executable, "-m", "stages.plan", "count", str(tmp_path / "missing.json")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.json" in bad.stderr


def test_unsupported_configs_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        from_hf_config({"model_type": "qwen2_moe", "hidden_size": 8, "num_attention_heads": 2,
                        "num_hidden_layers": 2, "intermediate_size": 8, "vocab_size": 10, "num_experts": 4,
                        "num_experts_per_tok": 1, "moe_intermediate_size": 4, "mlp_only_layers": [0]})
    with pytest.raises(ConfigError, match="gpt2"):
        from_hf_config({"model_type": "gpt2"})


# ------------------------------------------------------------------------------- the planner
@pytest.mark.parametrize("params", list(default_tiny_big()), ids=["default", "tiny", "120M"])
def test_runs_share_the_budget(params) -> None:
    pl = params.budget
    plans = {r: plan_run(params, r) for r in params.runs}
    for name, plan in plans.items():
        arch_ = plan.arch
        assert abs(arch_.nonvocab_total / params.budget.params - 1) <= pl.params_tol, (name, arch_.nonvocab_total)
        target = params.runs[name].activation_rate
        if target is not None:
            assert abs(arch_.activation_rate / target - 1) <= pl.rate_tol, (name, arch_.activation_rate)
        # T_i = C / F_i, to within one optimizer step
        f = plan.flops_per_token
        assert params.budget.compute - f * plan.tokens_per_step < f * plan.tokens <= params.budget.compute
        # passes over the unique stream (U tokens, EOS included) read as windows of seq_len (issue 14)
        assert plan.epochs == plan.tokens / plan.arch.seq_len / ((params.budget.unique_tokens - 1) // plan.arch.seq_len)
    dense = next(p for p in plans.values() if p.arch.kind == "dense")
    for plan in plans.values():
        # at equal C, tokens scale as 1 / F_i (relative to the dense run)
        expected = dense.tokens * dense.flops_per_token / plan.flops_per_token
        assert abs(plan.tokens / expected - 1) < 0.02 + plan.tokens_per_step / plan.tokens


@pytest.mark.parametrize("convention", ["6n", "nonvocab", "exact"])
def test_compute_conventions(convention: str) -> None:
    d = copy.deepcopy(TINY)
    d["budget"]["compute_convention"] = convention
    p = parse_params(d)
    plan = plan_run(p, "moe_r50")
    f = plan.arch.train_flops_per_token(convention, p.tokenizer.vocab_size)
    assert plan.flops_per_token == f and plan.steps == math.floor(p.budget.compute / f / plan.tokens_per_step)
    assert plan.to_dict()["compute_convention"] == convention


def test_rate_below_attention_share_is_a_plan_error() -> None:
    p = parse_params(TINY)
    with pytest.raises(PlanError, match="attention, norms"):
        solve_architecture(p.model, RunConfig(kind="moe", activation_rate=0.05), p.budget.params, "x")


def test_explicit_experts_choose_top_k() -> None:
    p = parse_params(TINY)
    arch_ = solve_architecture(p.model, RunConfig(kind="moe", activation_rate=0.5, experts=12), 30000, "x")
    assert arch_.experts == 12 and 1 <= arch_.top_k < 12 and abs(arch_.activation_rate / 0.5 - 1) <= 0.02


def test_infeasible_shape_says_what_to_relax() -> None:
    """r_a = 0.5 with top_k = 1 fixed at this size is out of reach: the error names the knobs."""
    p = parse_params(TINY)
    with pytest.raises(PlanError) as err:
        solve_architecture(p.model, RunConfig(kind="moe", activation_rate=0.5, top_k=1), p.budget.params, "x")
    msg = str(err.value)
    assert "add top_k to runs.x.vary" in msg and "reachable activation_rate" in msg


def test_tolerances_are_options() -> None:
    p = parse_params(TINY)
    loose = PlannerConfig(rate_tol=0.2, params_tol=0.02)
    a = solve_architecture(p.model, RunConfig(kind="moe", activation_rate=0.5, top_k=1), p.budget.params, "x",
                           loose)
    assert abs(a.activation_rate / 0.5 - 1) <= 0.2


def test_granularity_picks_the_expert_width() -> None:
    p = parse_params(big_params())
    dense_f = plan_run(p, "dense").arch.ffn_hidden
    widths = {}
    for g in (4, 16):
        run = RunConfig(kind="moe", activation_rate=0.2, top_k=2, granularity=g, vary=["expert_width", "experts",
                                                                                          "top_k"])
        a = solve_architecture(p.model, run, p.budget.params, "g", p.budget)
        assert abs(a.nonvocab_total / p.budget.params - 1) <= 0.01 and abs(a.activation_rate / 0.2 - 1) <= 0.02
        widths[g] = a.ffn_hidden
    assert widths[16] < widths[4]  # finer granularity, narrower experts
    assert abs(math.log(widths[16] / (dense_f / 16))) < abs(math.log(widths[4] / (dense_f / 16)))


def test_shared_experts_and_dense_first_layers_are_planned() -> None:
    d = big_params()
    d["model"] |= {"first_dense_layers": 1, "n_kv_heads": 4}
    d["runs"] = {"dense": {"kind": "dense"},
                 "moe": {"kind": "moe", "activation_rate": 0.3, "top_k": 2, "shared_experts": 1,
                         "vary": ["expert_width", "experts", "top_k"]}}
    p = parse_params(d)
    a = plan_run(p, "moe").arch
    assert a.shared_experts == 1 and a.first_dense_layers == 1 and a.n_kv_heads == 4
    assert a.dense_ffn_hidden == plan_run(p, "dense").arch.ffn_hidden
    assert abs(a.nonvocab_total / 1.2e8 - 1) <= 0.01 and abs(a.activation_rate / 0.3 - 1) <= 0.02


def test_budget_below_one_step_is_a_plan_error() -> None:
    d = copy.deepcopy(TINY)
    d["budget"]["compute"] = 1e6
    with pytest.raises(PlanError, match="one optimizer step"):
        plan_run(parse_params(d), "dense")


def test_with_embeddings_budget() -> None:
    d = copy.deepcopy(TINY)
    d["budget"]["count_embeddings"] = "with_embeddings"
    d["budget"]["params"] = 30000 + 320 * 32
    p = parse_params(d)
    a = plan_run(p, "dense").arch
    assert abs(a.total_params(320, "with_embeddings") / d["budget"]["params"] - 1) <= 0.01
