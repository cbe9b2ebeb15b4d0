"""collect@run + aggregate on fabricated run outputs: the DuckDB tables and views, the study status, exports.

The run files follow the contracts of plan.json, train.json (with the issue-4 `audit` where a test adds
it), steps.parquet (written by the trainer's own moe_study.train.trainlog.write_steps_parquet) and
work/eval/<run>.json; every expected number is recomputed here from those files, not read back from the
code under test.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_study.accounting import AUDIT_TOLERANCE, plan_run
from moe_study.config.schema import Params, parse_params
from moe_study.evaluation.stats import t95, wilson
from moe_study.io import write_json
from moe_study.report.aggregate import aggregate, group_rows
from moe_study.report.collect import RUN_COLUMNS, CollectError, run_collect
from moe_study.train.trainlog import StepStats, write_steps_parquet

RAW: dict[str, Any] = {
    "study": "agg",
    "corpus": {"sources": [{"kind": "synthetic", "docs": 10}]},
    "budget": {"params": 30000, "compute": 6 * 30000 * 16 * 32 * 12, "unique_tokens": 6000, "params_tol": 0.2,
               "rate_tol": 0.3},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32, "multiple_of": 2},
    "runs": {
        "dense_s0": {"kind": "dense", "seed": 0, "group": "dense"},
        "dense_s1": {"kind": "dense", "seed": 1, "group": "dense"},
        "moe_s0": {"kind": "moe", "activation_rate": 0.5, "top_k": 1, "seed": 0, "group": "moe"},
        "moe_s1": {"kind": "moe", "activation_rate": 0.5, "top_k": 1, "seed": 1, "group": "moe"},
        "moe_r25": {"kind": "moe", "activation_rate": 0.3, "top_k": 1},
    },
}
ISSUE_COLUMNS = ["run_id", "study", "kind", "total_params", "active_params", "activation_rate", "experts", "top_k",
                 "shared_experts", "train_flops", "tokens_seen", "unique_tokens", "epochs", "val_loss", "val_bpb",
                 "cloze_acc", "choice_acc", "audit_params_dev", "audit_active_dev", "audit_tokens_dev",
                 "audit_flops_dev", "audit_max_dev", "audit_ok", "params_sha256"]


DOC_TOKENS = np.random.default_rng(9).integers(20, 200, size=60)
DOC_BYTES = (DOC_TOKENS * 1.7).astype(np.int64) + 1
DOC_EFFECT = np.random.default_rng(10).normal(0, 0.5, size=60)  # document difficulty, shared by every run


def fabricate(work: Path, p: Params, run: str, rng: np.random.Generator, audit_dev: float | None = None,
              partial_steps: bool = False, audit_ok: bool | None = None) -> dict[str, Any]:
    """plan.json, train.json, the curve and eval JSON of one run, with random but consistent figures."""
    plan = plan_run(p, run).to_dict() | {"data_seed": 0}
    plan["provenance"] = {"params": {"budget": p.budget.model_dump()}, "params_sha256": f"plan-{run}"}
    rdir = work / "runs" / run
    write_json(rdir / "plan.json", plan)
    arch = plan["arch"]
    train: dict[str, Any] = {
        "run": run, "kind": arch["kind"], "nonvocab_params": plan["nonvocab_params"],
        "nonvocab_active": plan["nonvocab_active"], "tokens_seen": plan["tokens"], "steps": plan["steps"],
        "lr": p.run_lr(run), "seed": p.run_seed(run), "final_train_loss": float(rng.uniform(4, 5)),
        "wall_seconds": 1.5, "provenance": {"params_sha256": f"train-{run}"},
        "expert_load": None,
    }
    if arch["kind"] == "moe":
        frac = rng.dirichlet(np.ones(arch["experts"]), size=arch["n_layers"])
        train["expert_load"] = {"fraction_per_expert": frac.round(6).tolist()}
    if audit_dev is not None:
        entry = {"plan": 100.0, "actual": 100.0 * (1 + audit_dev), "rel_dev": audit_dev}
        small = {"plan": 1.0, "actual": 1.0, "rel_dev": 0.0}
        train["audit"] = {"nonvocab_params": entry, "nonvocab_active": small, "tokens": small,
                          "flops_per_token": small, "max_rel_dev": abs(audit_dev),
                          "ok": abs(audit_dev) <= AUDIT_TOLERANCE if audit_ok is None else audit_ok}
    write_json(rdir / "train.json", train)
    steps = list(range(1, plan["steps"] + 1))
    losses = [5.5 - 0.05 * s + float(rng.normal(0, 0.01)) for s in steps]
    moe = arch["kind"] == "moe"
    history = [StepStats(step=s, loss=loss, lr=1e-3, tokens=s * plan["tokens_per_step"], aux_loss=1.01 if moe else 0.0,
                         z_loss=0.002 if moe else 0.0, grad_norm=0.5, tokens_per_s=1e4, mfu=0.01,
                         load_max_over_mean=1.2 if moe else None, load_entropy=0.9 if moe else None)
               for s, loss in zip(steps, losses, strict=True)]
    write_steps_parquet(rdir / "steps.parquet", history, arch["kind"])
    if partial_steps:  # a trainer that logs fewer columns
        pq.write_table(pq.read_table(rdir / "steps.parquet").drop_columns(["mfu", "load_entropy"]),
                       rdir / "steps.parquet")
    # per-document scores: the same documents for every run (DOC_TOKENS), nats around the run's loss
    level = float(rng.uniform(4, 5))
    nats = DOC_TOKENS * (level + DOC_EFFECT + rng.normal(0, 0.05, size=len(DOC_TOKENS)))
    loss = float(nats.sum() / DOC_TOKENS.sum())
    bpb = float(nats.sum() / np.log(2) / DOC_BYTES.sum())
    (work / "eval").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"split": ["heldout"] * len(nats), "doc": np.arange(len(nats)) * 3, "nats": nats,
                             "tokens": DOC_TOKENS, "bytes": DOC_BYTES}), work / "eval" / f"{run}.docs.parquet")
    n_cloze, n_choice = 500, 400
    cloze, choice = int(rng.integers(0, 100)), int(rng.integers(100, 300))
    e = {"run": run, "kind": arch["kind"], "plan": {k: plan[k] for k in ("nonvocab_params", "nonvocab_active")},
         "loss": loss, "bpb": bpb, "perplexity": float(np.exp(loss)), "loss_ci": [loss - 0.1, loss + 0.1],
         "bpb_ci": [bpb - 0.05, bpb + 0.05], "tokens": int(DOC_TOKENS.sum()), "bytes": int(DOC_BYTES.sum()),
         "validation": {"loss": level + float(rng.normal(0, 0.01)), "bpb": 0.0, "tokens": 1, "bytes": 1, "docs": 1},
         "tasks": {"cloze": {"items": n_cloze, "correct": cloze, "acc": cloze / n_cloze, "acc_ci": [0.0, 1.0]},
                   "choice": {"items": n_choice, "correct": choice, "acc": choice / n_choice, "acc_ci": [0.1, 0.9]}},
         "provenance": {"params_sha256": f"eval-{run}"}}
    write_json(work / "eval" / f"{run}.json", e)
    return {"plan": plan, "train": train, "eval": e, "losses": losses}


def build(tmp_path: Path, raw: dict[str, Any] = RAW, audit: dict[str, float] | None = None,
          partial_steps: tuple[str, ...] = (), audit_ok: dict[str, bool] | None = None,
          ) -> tuple[Params, dict[str, dict], Path, str]:
    p = parse_params(raw)
    work, results = tmp_path / "work", tmp_path / "results" / p.study
    rng = np.random.default_rng(0)
    runs = {r: fabricate(work, p, r, rng, (audit or {}).get(r), r in partial_steps, (audit_ok or {}).get(r))
            for r in sorted(p.runs)}
    for r in runs:
        run_collect(p, r, work=work)
    summary = aggregate(p, collect_dir=work / "collect", results=results,
                        current_copy=tmp_path / "results/metrics.duckdb")
    return p, runs, results, summary


def rows(db: Path, sql: str) -> list[dict[str, Any]]:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    out = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    con.close()
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, dict[str, dict], Path, str]:
    audit = {"dense_s0": 0.002, "moe_s0": 0.0005, "moe_s1": 0.0, "dense_s1": 0.0, "moe_r25": 0.001}
    return build(tmp_path_factory.mktemp("agg"), audit=audit, partial_steps=("moe_s1",))


def test_runs_table_has_the_issue_columns_and_the_run_files_values(study) -> None:
    p, runs, results, _ = study
    db = results / "metrics.duckdb"
    got = {r["run_id"]: r for r in rows(db, "SELECT * FROM runs")}
    assert set(got) == set(p.runs)
    assert [c for c in ISSUE_COLUMNS if c not in got["dense_s0"]] == []
    assert list(got["dense_s0"]) == [c for c, _ in RUN_COLUMNS]
    for run, files in runs.items():
        r, plan, train, e = got[run], files["plan"], files["train"], files["eval"]
        assert r["study"] == "agg" and r["kind"] == plan["arch"]["kind"]
        assert (r["total_params"], r["active_params"]) == (train["nonvocab_params"], train["nonvocab_active"])
        assert r["activation_rate"] == pytest.approx(plan["nonvocab_active"] / plan["nonvocab_params"])
        assert (r["experts"], r["top_k"], r["shared_experts"]) == (plan["arch"]["experts"], plan["arch"]["top_k"], 0)
        assert r["train_flops"] == pytest.approx(plan["flops_per_token"] * train["tokens_seen"])
        step_flops = plan["flops_per_token"] * plan["tokens_per_step"]  # whole steps: at most C, within a step
        assert plan["compute"] - step_flops < r["train_flops"] <= plan["compute"]
        assert r["tokens_seen"] == train["tokens_seen"] and r["unique_tokens"] == 6000
        assert r["epochs"] == pytest.approx(train["tokens_seen"] / 32 / ((6000 - 1) // 32))  # passes (issue 14)
        assert (r["val_loss"], r["val_bpb"]) == (e["loss"], e["bpb"])
        assert r["cloze_acc"] == e["tasks"]["cloze"]["acc"] and r["choice_acc"] == e["tasks"]["choice"]["acc"]
        assert (r["seed"], r["lr"]) == (p.run_seed(run), p.run_lr(run))
        assert r["audit_params_dev"] == pytest.approx(train["audit"]["nonvocab_params"]["rel_dev"])
        assert r["audit_max_dev"] == pytest.approx(train["audit"]["max_rel_dev"]) and r["audit_ok"] is True
    assert len({r["params_sha256"] for r in got.values()}) == len(got)
    assert (tmp := results.parent / "metrics.duckdb").read_bytes() == db.read_bytes(), tmp


def test_steps_table_is_the_runs_steps_parquet(study) -> None:
    _, runs, results, _ = study
    steps = rows(results / "metrics.duckdb", "SELECT * FROM steps ORDER BY run_id, step")
    for run, files in runs.items():
        mine = [s for s in steps if s["run_id"] == run]
        assert [s["step"] for s in mine] == list(range(1, files["plan"]["steps"] + 1))
        assert [s["loss"] for s in mine] == pytest.approx(files["losses"])
        assert mine[-1]["tokens"] == files["plan"]["tokens"]
    moe = [s for s in steps if s["run_id"] == "moe_s0"]
    assert all(s["mfu"] == 0.01 and s["load_max_over_mean"] == 1.2 and s["aux_loss"] == 1.01 for s in moe)
    partial = [s for s in steps if s["run_id"] == "moe_s1"]  # columns its steps.parquet lacks are null
    assert all(s["mfu"] is None and s["load_entropy"] is None and s["aux_loss"] == 1.01 for s in partial)
    dense = [s for s in steps if s["run_id"].startswith("dense")]
    assert dense and all(s["aux_loss"] is None and s["load_max_over_mean"] is None for s in dense)  # no router


def test_expert_load_table(study) -> None:
    _, runs, results, _ = study
    load = rows(results / "metrics.duckdb", "SELECT * FROM expert_load ORDER BY run_id, layer, expert")
    assert {x["run_id"] for x in load} == {"moe_s0", "moe_s1", "moe_r25"}
    frac = runs["moe_r25"]["train"]["expert_load"]["fraction_per_expert"]
    mine = [x for x in load if x["run_id"] == "moe_r25"]
    assert [x["fraction"] for x in mine] == pytest.approx([f for layer in frac for f in layer])
    assert mine[0]["over_uniform"] == pytest.approx(frac[0][0] * len(frac[0]))


def test_moe_vs_dense_view(study) -> None:
    _, runs, results, _ = study
    view = {r["run_id"]: r for r in rows(results / "metrics.duckdb", "SELECT * FROM moe_vs_dense")}
    assert set(view) == {"moe_s0", "moe_s1", "moe_r25"}
    dense_loss = statistics.fmean(runs[d]["eval"]["loss"] for d in ("dense_s0", "dense_s1"))
    dense_bpb = statistics.fmean(runs[d]["eval"]["bpb"] for d in ("dense_s0", "dense_s1"))
    dense_choice = statistics.fmean(runs[d]["eval"]["tasks"]["choice"]["acc"] for d in ("dense_s0", "dense_s1"))
    for run, v in view.items():
        e = runs[run]["eval"]
        assert v["d_val_loss"] == pytest.approx(e["loss"] - dense_loss)
        assert v["d_val_bpb"] == pytest.approx(e["bpb"] - dense_bpb)
        assert v["d_choice_acc"] == pytest.approx(e["tasks"]["choice"]["acc"] - dense_choice)
        assert v["dense_runs"] == 2 and v["dense_run_ids"] == "dense_s0,dense_s1"


def test_dense_baseline_is_the_mean_of_the_dense_runs_in_the_views_and_the_summary(tmp_path: Path) -> None:
    """Two dense groups at one (N, C, U) with 2 and 1 seeds: every run counts once, in SQL and in the summary."""
    raw = copy.deepcopy(RAW)
    raw["runs"]["dense_lr"] = {"kind": "dense", "lr": 1e-3, "seed": 2}
    _, runs, results, summary = build(tmp_path, raw)
    bpb = {r: f["eval"]["bpb"] for r, f in runs.items()}
    dense = ("dense_lr", "dense_s0", "dense_s1")
    baseline = statistics.fmean(bpb[d] for d in dense)
    group_means = statistics.fmean([statistics.fmean([bpb["dense_s0"], bpb["dense_s1"]]), bpb["dense_lr"]])
    assert abs(baseline - group_means) > 1e-3  # the two definitions differ here, visibly at 4 decimals
    db = results / "metrics.duckdb"
    [b] = rows(db, "SELECT * FROM dense_baseline")
    assert (b["dense_runs"], b["dense_run_ids"], b["dense_groups"]) == (3, ",".join(dense), "dense,dense_lr")
    assert b["dense_val_bpb"] == pytest.approx(baseline)
    view = {r["run_id"]: r for r in rows(db, "SELECT * FROM moe_vs_dense")}
    assert {r: v["d_val_bpb"] for r, v in view.items()} == pytest.approx({r: bpb[r] - baseline for r in view})
    moe = statistics.fmean([bpb["moe_s0"], bpb["moe_s1"]])
    [line] = [x for x in summary.splitlines() if x.startswith("| moe | moe | 2 |")]
    assert line.split(" | ")[11] == f"{moe - baseline:+.4f}"
    assert statistics.fmean([view["moe_s0"]["d_val_bpb"], view["moe_s1"]["d_val_bpb"]]) == pytest.approx(
        moe - baseline)  # a group's Δ is the mean of its runs' Δ in the view
    [line] = [x for x in summary.splitlines() if x.startswith("| dense_lr | dense | 1 |")]
    assert line.split(" | ")[11] == f"{bpb['dense_lr'] - baseline:+.4f}"


def test_by_activation_rate_view(study) -> None:
    _, runs, results, _ = study
    view = rows(results / "metrics.duckdb", "SELECT * FROM by_activation_rate")
    assert [v["runs"] for v in view] == [2, 2, 1]  # dense (r_a 1), moe (0.5-ish), moe_r25
    moe = view[1]
    assert moe["kind"] == "moe" and moe["groups"] == "moe"
    assert moe["val_loss"] == pytest.approx(statistics.fmean(runs[r]["eval"]["loss"] for r in ("moe_s0", "moe_s1")))
    assert moe["val_loss_sd"] == pytest.approx(statistics.stdev(runs[r]["eval"]["loss"] for r in ("moe_s0", "moe_s1")))


def test_summary_csv_metrics_and_plots(study) -> None:
    p, runs, results, summary = study
    assert (results / "summary.md").read_text() == summary
    assert "Status: **ok** (5 of 5 runs audited" in summary and "| moe_r25 |" in summary
    g = {x["grp"]: x for x in group_rows(rows(results / "metrics.duckdb", "SELECT * FROM runs"))}
    loss = [runs[r]["eval"]["loss"] for r in ("dense_s0", "dense_s1")]
    half = t95(2) * statistics.stdev(loss) / 2 ** 0.5
    assert g["dense"]["val_loss_lo"] == pytest.approx(statistics.fmean(loss) - half)
    assert f"{statistics.fmean(loss):.4f} [{statistics.fmean(loss) - half:.4f}" in summary
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["moe_s1"]["val_bpb"] == runs["moe_s1"]["eval"]["bpb"] and metrics["_study"]["status"] == "ok"
    assert metrics["moe_s1"]["choice_acc"] == runs["moe_s1"]["eval"]["tasks"]["choice"]["acc"]
    lines = list(csv.DictReader((results / "results.csv").read_text().splitlines()))
    assert [r["run_id"] for r in lines] == sorted(p.runs)
    for png in ("loss_vs_activation.png", "training_curves.png", "expert_load.png"):
        data = (results / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_a_run_that_deviates_fails_the_study(tmp_path: Path) -> None:
    _, _, results, summary = build(tmp_path, audit={"moe_s1": 0.02, "dense_s0": 0.0})
    study = rows(results / "metrics.duckdb", "SELECT * FROM study")[0]
    assert study["status"] == "failed" and study["audit_failed_runs"] == "moe_s1"
    assert study["audited_runs"] == 2 and study["audit_max_dev"] == pytest.approx(0.02)
    assert "**FAILED**" in summary and "moe_s1" in summary.split("\n")[2]
    assert json.loads((results / "metrics.json").read_text())["_study"]["status"] == "failed"


def test_the_study_verdict_is_the_audits_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """aggregate does not re-judge a deviation: `ok` is moe_study/train/audit.py's; the summary prints the tolerance."""
    monkeypatch.setattr("moe_study.report.summary.AUDIT_TOLERANCE", 0.05)  # what the summary names, not a literal
    dev = 2 * AUDIT_TOLERANCE
    _, _, results, summary = build(tmp_path, audit={"moe_s1": dev, "moe_s0": dev / 10, "dense_s0": 0.0},
                                   audit_ok={"moe_s1": True, "moe_s0": False})
    study = rows(results / "metrics.duckdb", "SELECT * FROM study")[0]
    assert study["status"] == "failed" and study["audit_failed_runs"] == "moe_s0"
    assert study["audit_max_dev"] == pytest.approx(dev)
    assert "runs moe_s0 deviate from their planned N, N_active, tokens or FLOPs by more than 5% " in summary


def test_without_audit_or_tasks_columns_are_null(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["runs"] = {k: raw["runs"][k] for k in ("dense_s0", "moe_s0")}
    p = parse_params(raw)
    work = tmp_path / "work"
    fabricate(work, p, "dense_s0", np.random.default_rng(1))
    fabricate(work, p, "moe_s0", np.random.default_rng(2))
    e = json.loads((work / "eval/moe_s0.json").read_text())
    e["tasks"] = None
    write_json(work / "eval/moe_s0.json", e)
    for r in p.runs:
        run_collect(p, r, work=work)
    summary = aggregate(p, collect_dir=work / "collect", results=tmp_path / "res", current_copy=None)
    got = {r["run_id"]: r for r in rows(tmp_path / "res/metrics.duckdb", "SELECT * FROM runs")}
    assert got["moe_s0"]["cloze_acc"] is None and got["moe_s0"]["audit_ok"] is None
    assert rows(tmp_path / "res/metrics.duckdb", "SELECT status FROM study")[0]["status"] == "ok"
    assert "0 of 2 runs audited" in summary


@pytest.mark.parametrize(("file", "key"), [("train", "seed"), ("train", "lr"), ("train", "wall_seconds"),
                                         ("train", "provenance.params_sha256"), ("plan", "target_params"),
                                         ("plan", "arch.experts"), ("eval", "perplexity"), ("eval", "tasks")])
def test_collect_names_the_file_and_the_missing_key(tmp_path: Path, file: str, key: str) -> None:
    """No silent defaults: a plan/train/eval JSON without a key collect reads is an error naming both."""
    p = parse_params(RAW)
    work = tmp_path / "work"
    fabricate(work, p, "moe_s0", np.random.default_rng(0))
    path = {"plan": work / "runs/moe_s0/plan.json", "train": work / "runs/moe_s0/train.json",
            "eval": work / "eval/moe_s0.json"}[file]
    d = json.loads(path.read_text())
    *parents, last = key.split(".")
    obj = d
    for part in parents:
        obj = obj[part]
    del obj[last]
    write_json(path, d)
    with pytest.raises(CollectError, match=re.escape(f"{path}: missing key `{key}`")):
        run_collect(p, "moe_s0", work=work)


def test_collect_needs_steps_parquet(tmp_path: Path) -> None:
    """train always writes steps.parquet; without it collect stops and names the file."""
    p = parse_params(RAW)
    work = tmp_path / "work"
    fabricate(work, p, "dense_s0", np.random.default_rng(0))
    rdir = work / "runs/dense_s0"
    (rdir / "steps.parquet").unlink()
    with pytest.raises(CollectError, match=re.escape(f"{rdir / 'steps.parquet'}: missing (run the train stage)")):
        run_collect(p, "dense_s0", work=work)


def test_aggregate_reads_only_the_runs_in_params(tmp_path: Path) -> None:
    """A stale collect output of a run no longer in params.yaml stays out of the study."""
    p, _, results, _ = build(tmp_path)
    raw = copy.deepcopy(RAW)
    del raw["runs"]["moe_r25"]
    aggregate(parse_params(raw), collect_dir=tmp_path / "work/collect", results=results, current_copy=None)
    assert "moe_r25" not in {r["run_id"] for r in rows(results / "metrics.duckdb", "SELECT run_id FROM runs")}
    with pytest.raises(ValueError, match="collect"):
        raw["runs"]["new"] = {"kind": "dense"}
        aggregate(parse_params(raw), collect_dir=tmp_path / "work/collect", results=results, current_copy=None)


def test_accuracy_interval_over_seeds_keeps_the_item_sampling() -> None:
    """Two seeds with the same accuracy: the t-interval has width 0, the pooled Wilson one does not."""
    base = {"grp": "g", "kind": "moe", "size": 1.0, "activation_rate": 0.5, "tokens_seen": 10, "epochs": 1.0,
            "val_loss": 1.0, "val_bpb": 1.0, "cloze_items": 500, "choice_items": 500}
    rs = [base | {"cloze_acc": 0.04, "choice_acc": 0.30}, base | {"cloze_acc": 0.04, "choice_acc": 0.40}]
    g = group_rows(rs)[0]
    assert (g["cloze_lo"], g["cloze_hi"]) == pytest.approx(wilson(40, 1000))
    half = t95(2) * statistics.stdev([0.3, 0.4]) / 2 ** 0.5  # wider than Wilson, clipped to [0, 1]
    assert (g["choice_lo"], g["choice_hi"]) == pytest.approx((max(0.0, 0.35 - half), min(1.0, 0.35 + half)))


@pytest.mark.parametrize(("n", "t"), [(2, 12.706), (5, 2.776), (11, 2.228), (16, 2.131), (31, 2.042), (121, 1.980)])
def test_t_quantiles(n: int, t: float) -> None:
    assert t95(n) == pytest.approx(t, abs=5e-4)  # the printed tables round to 3 decimals


# ------------------------------------------------------------------------- issue 14: intervals, lr grid
def test_every_delta_has_a_95_interval_paired_for_one_seed_welch_over_seeds(study) -> None:
    from scipy import stats

    p, runs, results, summary = study
    db = results / "metrics.duckdb"
    dense = ("dense_s0", "dense_s1")
    docs = {r: pq.read_table(Path(results).parent.parent / "work/eval" / f"{r}.docs.parquet") for r in runs}
    view = {r["run_id"]: r for r in rows(db, "SELECT * FROM moe_vs_dense")}
    for run, v in view.items():  # one run = one seed: paired bootstrap over the held-out documents
        assert v["ci_method"] == "paired_bootstrap" and v["at_best_lr"]
        diff = docs[run].column("nats").to_numpy() - np.mean([docs[d].column("nats").to_numpy() for d in dense], 0)
        rng = np.random.default_rng(p.eval.seed)
        draws = []
        for s in range(0, p.eval.bootstrap, 64):  # the same draws as the code: blocks of 64 resamples
            idx = rng.integers(0, len(diff), size=(min(64, p.eval.bootstrap - s), len(diff)))
            draws += (diff[idx].sum(1) / DOC_TOKENS[idx].sum(1)).tolist()
        assert (v["d_val_loss_lo"], v["d_val_loss_hi"]) == pytest.approx(
            (np.percentile(draws, 2.5), np.percentile(draws, 97.5)))
        assert v["d_val_loss_lo"] < v["d_val_loss"] < v["d_val_loss_hi"]
        assert v["d_val_bpb_lo"] < v["d_val_bpb"] < v["d_val_bpb_hi"]
        assert v["d_val_bpb_excludes_zero"] == (v["d_val_bpb_lo"] > 0 or v["d_val_bpb_hi"] < 0)
    groups = {g["grp"]: g for g in rows(db, "SELECT * FROM group_vs_dense")}
    assert groups["moe_r25"]["ci_method"] == "paired_bootstrap"  # one seed against two
    g = groups["moe"]
    assert g["ci_method"] == "welch" and g["seeds"] == 2 and g["dense_runs"] == 2
    a = [runs[r]["eval"]["bpb"] for r in ("moe_s0", "moe_s1")]
    b = [runs[r]["eval"]["bpb"] for r in dense]
    va, vb = np.var(a, ddof=1) / 2, np.var(b, ddof=1) / 2
    df = (va + vb) ** 2 / (va**2 + vb**2)
    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    d = np.mean(a) - np.mean(b)
    assert (g["d_val_bpb"], g["d_val_bpb_lo"], g["d_val_bpb_hi"]) == pytest.approx((d, d - half, d + half))
    assert "## MoE vs dense, per group" in summary and "| moe | " in summary and "welch" in summary


def test_lr_grid_runs_expand_and_each_group_is_compared_at_its_best_validation_lr(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["runs"] = {"dense_s0": {"kind": "dense", "seed": 0, "group": "dense", "lr_grid": [1e-3, 3e-3]},
                   "moe_s0": {"kind": "moe", "activation_rate": 0.5, "top_k": 1, "seed": 0, "group": "moe",
                              "lr_grid": [1e-3, 3e-3, 1e-2]}}
    p, runs, results, summary = build(tmp_path, raw)
    assert sorted(p.runs) == ["dense_s0_lr1e-3", "dense_s0_lr3e-3", "moe_s0_lr1e-2", "moe_s0_lr1e-3", "moe_s0_lr3e-3"]
    db = results / "metrics.duckdb"
    choice = rows(db, "SELECT * FROM lr_choice ORDER BY grp, lr")
    assert len(choice) == 5 and all(c["grid"] == (2 if c["grp"] == "dense" else 3) for c in choice)
    best = {}
    for grp in ("dense", "moe"):
        mine = {r: f for r, f in runs.items() if r.startswith(f"{grp}_s0_")}
        best[grp] = min(mine, key=lambda r: mine[r]["eval"]["validation"]["loss"])
        [c] = [c for c in choice if c["grp"] == grp and c["best"]]
        assert c["run_ids"] == best[grp]
    [b] = rows(db, "SELECT * FROM dense_baseline")
    assert b["dense_run_ids"] == best["dense"]  # the dense arm at its own best lr, not pooled over the grid
    [g] = rows(db, "SELECT * FROM group_vs_dense")
    assert g["run_ids"] == best["moe"]
    assert g["d_val_bpb"] == pytest.approx(runs[best["moe"]]["eval"]["bpb"] - runs[best["dense"]]["eval"]["bpb"])
    assert "## Learning-rate grid" in summary and summary.count("**best**") == 2


def test_lr_grid_without_validation_scores_is_an_error_naming_the_group(tmp_path: Path) -> None:
    from moe_study.report.aggregate import AggregateError, choose_lr

    rs = [{"study": "s", "grp": "moe", "run_id": f"m{i}", "lr": lr, "validation_loss": None, "validation_bpb": None,
           "val_loss": 1.0, "val_bpb": 1.0} for i, lr in enumerate((1e-3, 3e-3))]
    with pytest.raises(AggregateError, match="group 'moe': 2 learning rates but no validation scores"):
        choose_lr(rs)


def test_group_metadata_must_agree_across_seeds() -> None:
    from moe_study.report.aggregate import AggregateError

    base = {"grp": "moe", "kind": "moe", "size": 1.0, "activation_rate": 0.5, "tokens_seen": 10, "epochs": 1.0,
            "val_loss": 1.0, "val_bpb": 1.0, "cloze_items": 0, "choice_items": 0, "cloze_acc": None,
            "choice_acc": None, "total_params": 100}
    group_rows([base | {"run_id": "a"}, base | {"run_id": "b"}])
    with pytest.raises(AggregateError, match=r"group 'moe': total_params differs across its runs \(a: 100, b: 101\)"):
        group_rows([base | {"run_id": "a"}, base | {"run_id": "b", "total_params": 101}])


def test_moe_groups_are_compared_with_dense_at_2c_apart_from_the_equal_compute_baseline(tmp_path: Path) -> None:
    """Dense at 2C (compute_scale 2, same N and U: reads U twice) is the paper's data-reuse reference: its own
    table `group_vs_dense_other_compute`, never pooled into the equal-compute baseline."""
    raw = copy.deepcopy(RAW)
    raw["runs"] |= {"dense2c_s0": {"kind": "dense", "compute_scale": 2.0, "seed": 0, "group": "dense2c"},
                    "dense2c_s1": {"kind": "dense", "compute_scale": 2.0, "seed": 1, "group": "dense2c"}}
    _, runs, results, summary = build(tmp_path, raw)
    db = results / "metrics.duckdb"
    bpb = {r: f["eval"]["bpb"] for r, f in runs.items()}
    same = {g["grp"]: g for g in rows(db, "SELECT * FROM group_vs_dense")}
    assert {g["dense_run_ids"] for g in same.values()} == {"dense_s0,dense_s1"}
    other = {g["grp"]: g for g in rows(db, "SELECT * FROM group_vs_dense_other_compute")}
    assert set(other) == {"moe", "moe_r25"}
    for grp, mine in (("moe", ("moe_s0", "moe_s1")), ("moe_r25", ("moe_r25",))):
        g = other[grp]
        assert g["compute_ratio"] == pytest.approx(2.0) and g["dense_run_ids"] == "dense2c_s0,dense2c_s1"
        d = statistics.fmean(bpb[r] for r in mine) - statistics.fmean(bpb[r] for r in ("dense2c_s0", "dense2c_s1"))
        assert g["d_val_bpb"] == pytest.approx(d)
        assert g["d_val_bpb_lo"] < d < g["d_val_bpb_hi"]
    assert (other["moe"]["ci_method"], other["moe_r25"]["ci_method"]) == ("welch", "paired_bootstrap")
    assert "## MoE vs dense at another compute budget" in summary
    assert f"| moe | {other['moe']['activation_rate']:.3f} | 2 | ×2 | dense2c_s0,dense2c_s1 |" in summary


def test_without_dense_at_another_budget_the_other_compute_table_is_empty(study) -> None:
    _, _, results, summary = study
    assert rows(results / "metrics.duckdb", "SELECT * FROM group_vs_dense_other_compute") == []
    assert "another compute budget" not in summary


def test_activation_ticks_do_not_print_over_each_other() -> None:
    """Two sizes' designs give nearly the same rates (0.206 and 0.208): one tick each, labels in percent."""
    from moe_study.report.summary import _percent, _spaced_ticks

    rates = [0.083, 0.088, 0.159, 0.166, 0.206, 0.208, 0.270, 0.277, 0.578, 0.583, 0.95, 1.0]
    ticks = _spaced_ticks(rates)
    assert ticks == [0.083, 0.159, 0.206, 0.27, 0.578, 1.0]
    assert all(b / a >= 1.12 for a, b in zip(ticks, ticks[1:], strict=False))
    labels = [_percent(t) for t in ticks]
    assert labels == ["8.3%", "16%", "21%", "27%", "58%", "100%"]


def test_a_difference_that_rounds_to_zero_prints_without_a_minus_sign() -> None:
    """Dense at 2C minus its own mean is -1e-17 in floating point: the table said -0.0000."""
    from moe_study.report.summary import _f

    assert _f(-1e-17, "+.4f") == "+0.0000"
    assert _f(-1e-17, ".4f") == "0.0000"
    assert _f(-0.12345, "+.4f") == "-0.1235"
    assert _f(1234567, ",") == "1,234,567" and _f(None) == "-"
