"""Issue 14, items 2 and 7 (part): exact training FLOPs of every run, the `exact` default, the LM-head
warning under `nonvocab`; `epochs` = passes over the unique stream served, and the dense run reads all of U."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from test_aggregate import RAW, build

from moe_study.accounting import HEAD_SHARE_WARN, exact_train_flops, plan_run, unique_passes
from moe_study.config.schema import BudgetConfig, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _params(path: str = "params.yaml", **budget: Any) -> Any:
    d = yaml.safe_load((ROOT / path).read_text())
    d["budget"].update(budget)
    return parse_params(d, path)


def test_exact_is_the_default_and_the_tiny_study_uses_it() -> None:
    assert BudgetConfig.model_fields["compute_convention"].default == "exact"
    assert _params().budget.compute_convention == "exact"
    assert _params("studies/paper_2b.yaml").budget.compute_convention == "nonvocab"  # the paper's replication


def test_plan_records_train_flops_exact_and_head_share() -> None:
    p = _params()
    for run in p.runs:
        plan = plan_run(p, run)
        d = plan.to_dict()
        f_exact = plan.arch.train_flops_per_token("exact", p.tokenizer.vocab_size)
        assert d["train_flops_exact"] == pytest.approx(f_exact * plan.tokens)
        assert d["train_flops_exact"] == pytest.approx(d["compute_used"])  # exact: what is equalised
        assert d["lm_head_flops_share"] == pytest.approx(2 * 64 * 2048 / plan.arch.forward_flops(2048))
        assert not any("LM head" in w for w in d["warnings"])
        assert exact_train_flops(d, 1000) == pytest.approx(f_exact * 1000)


def test_nonvocab_warns_when_the_head_is_over_5_percent(caplog: pytest.LogCaptureFixture) -> None:
    p = _params(compute_convention="nonvocab", compute=1.396e12)
    with caplog.at_level(logging.WARNING, logger="moe_study.accounting"):
        plans = {run: plan_run(p, run).to_dict() for run in p.runs}
    for run, d in plans.items():
        assert d["lm_head_flops_share"] > HEAD_SHARE_WARN
        assert any("LM head" in w and "exact" in w for w in d["warnings"]), run
        assert d["train_flops_exact"] > d["compute_used"]  # the head is real compute nonvocab leaves out
    assert any("LM head" in r.getMessage() for r in caplog.records)


def test_runs_table_and_summary_carry_exact_flops_with_ratio_to_dense(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["budget"]["compute_convention"] = "nonvocab"
    p, runs, results, summary = build(tmp_path, raw)
    con = duckdb.connect(str(results / "metrics.duckdb"), read_only=True)
    got = {r[0]: r[1:] for r in con.execute("SELECT run_id, train_flops_exact, tokens_seen FROM runs").fetchall()}
    for run, files in runs.items():
        assert got[run][0] == pytest.approx(exact_train_flops(files["plan"], files["train"]["tokens_seen"]))
    dense = sum(got[r][0] for r in ("dense_s0", "dense_s1")) / 2
    view = dict(con.execute("SELECT run_id, flops_exact_vs_dense FROM moe_vs_dense").fetchall())
    con.close()
    assert view and all(v == pytest.approx(got[r][0] / dense) for r, v in view.items())
    assert "Compute equalised: training FLOPs in the `nonvocab` convention" in summary
    assert "exact FLOPs vs dense" in summary and f"×{view['moe_s0']:.3f}" in summary
    assert "train_flops_exact" in (results / "results.csv").read_text().splitlines()[0]


# ------------------------------------------------------------------------ epochs and all of U
def test_epochs_are_passes_over_the_stream_and_the_dense_run_reads_all_of_u() -> None:
    p = _params()
    S, U = p.model.seq_len, p.budget.unique_tokens
    for run in p.runs:
        d = plan_run(p, run).to_dict()
        assert d["epochs"] == pytest.approx(d["tokens"] / S / ((U - 1) // S))
        assert d["epochs"] == unique_passes(d["tokens"], U, S)
    dense = plan_run(p, "dense_s0").to_dict()
    assert dense["reads_all_unique"] and dense["epochs"] >= 1.0 and dense["warnings"] == []
    # the committed budget before this fix: the dense run stopped short of a pass, now it is a warning
    short = plan_run(_params(compute=2.18e12), "dense_s0").to_dict()
    assert not short["reads_all_unique"] and any("reads" in w and "budget.compute" in w for w in short["warnings"])


# ------------------------------------------------------------------------ design `paper`
def test_paper_design_fixes_expert_width_and_shared_width_k_times_it() -> None:
    """Design `paper` (1dense+SE): one routed width across the sweep, one shared expert of K x that width,
    first layer dense, r_a reached by E and K only; the plan table shows granularity, E, K, shared width."""
    from moe_study.report.plan_table import plans_from_params, rows

    p = _params("studies/paper_2b.yaml")
    assert p.budget.design == "paper" and (p.model.d_model, p.model.n_layers) == (1408, 16)
    archs = {r: plan_run(p, r).arch for r in p.runs if p.run(r).kind == "moe"}
    assert len(archs) >= 5 and {a.ffn_hidden for a in archs.values()} == {352}  # d_model / 4, fixed
    for a in archs.values():
        assert a.shared_experts == 1 and a.shared_width == a.top_k * a.ffn_hidden
        assert a.first_dense_layers == 1 and a.moe_layers == 15 and 50 <= a.experts <= 93
    ks = [archs[r].top_k for r in sorted(archs, key=lambda r: archs[r].activation_rate)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] > 8  # r_a moves with K (and E), not with the width
    table = {r["run"]: r for r in rows(plans_from_params(p))}
    r50 = table["moe_r50"]
    assert (r50["design"], r50["experts"], r50["top_k"], r50["shared_width"]) == (
        "paper", archs["moe_r50"].experts, archs["moe_r50"].top_k, archs["moe_r50"].shared_width)
    assert r50["granularity"] == pytest.approx(table["dense"]["dense_ffn"] / 352)
    md = (ROOT / "results/paper_2b/plan.md").read_text()
    assert "| granularity |" in md.replace("granularity | dense_ffn", "granularity |") or "granularity" in md
    # the default design keeps choosing the fewest routed experts per token (width moves with r_a)
    d = yaml.safe_load((ROOT / "studies/paper_2b.yaml").read_text())
    d["budget"]["design"] = "fewest_active"
    d["runs"] = {"moe_r50": {"kind": "moe", "activation_rate": 0.5, "top_k": 1,
                             "vary": ["expert_width", "experts", "top_k"]}}
    a = plan_run(parse_params(d), "moe_r50").arch
    assert a.shared_experts == 0 and a.ffn_hidden != 352
