"""The study plan table (Parquet + markdown) and the 2B study, planned only."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from conftest import TINY

from moe_study.config.load import load_params
from moe_study.config.schema import parse_params
from moe_study.report.plan_table import COLUMNS, markdown, parquet_bytes, plans_from_params, rows, write_table

ROOT = Path(__file__).resolve().parent.parent


def test_table_has_one_row_per_run_and_is_deterministic(tmp_path: Path) -> None:
    p = parse_params(TINY)
    pq_path, md_path = write_table(p, plans_from_params(p), root=tmp_path)
    t = pq.read_table(pq_path).to_pylist()
    assert [r["run"] for r in t] == sorted(p.runs) and set(t[0]) == {c for c, _, _ in COLUMNS}
    moe = next(r for r in t if r["kind"] == "moe")
    assert moe["tokens"] == moe["steps"] * p.train.batch_size * p.model.seq_len
    S = p.model.seq_len  # passes over the unique stream (issue 14)
    assert abs(moe["epochs"] - moe["tokens"] / S / ((p.budget.unique_tokens - 1) // S)) < 1e-12
    md = md_path.read_text()
    assert "| moe_r50 | moe |" in md and "T_i = C / flops_per_token_i" in md
    metrics = __import__("json").loads((tmp_path / "ci" / "plan_metrics.json").read_text())
    assert set(metrics["runs"]) == set(p.runs) and metrics["max_abs_params_rel_dev"] <= 0.01
    first = pq_path.read_bytes()
    write_table(p, plans_from_params(p), root=tmp_path)
    assert pq_path.read_bytes() == first


def test_paper_2b_study_is_valid_and_its_committed_table_is_current() -> None:
    r = subprocess.run([sys.executable, "-m", "moe_study.config.schema", "studies/paper_2b.yaml"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    p = load_params(ROOT / "studies" / "paper_2b.yaml")
    plans = plans_from_params(p)
    t = rows(plans)
    assert (ROOT / "results/paper_2b/plan.md").read_text() == markdown(p, t), \
        "run `python -m stages.plan_table studies/paper_2b.yaml`"
    assert pq.read_table(ROOT / "results/paper_2b/plan.parquet").to_pylist() == \
        pq.read_table(__import__("io").BytesIO(parquet_bytes(t))).to_pylist()
    dense = next(x for x in plans if x["arch"]["kind"] == "dense")
    assert 1.98e9 <= dense["nonvocab_params"] <= 2.02e9 and 1.0 <= dense["epochs"] <= 1.001  # reads all of U
    rates = sorted(x["target_activation_rate"] for x in plans if x["arch"]["kind"] == "moe")
    assert rates == [0.146, 0.19, 0.3, 0.4, 0.5, 0.58]  # design paper: rates its integer K reaches
    for x in plans:
        assert abs(x["params_rel_dev"]) <= 0.01 and (x["rate_rel_dev"] is None or abs(x["rate_rel_dev"]) <= 0.02)
        assert x["compute"] - x["flops_per_token"] * x["tokens_per_step"] < x["compute_used"] <= x["compute"]


def test_table_cli(tmp_path: Path) -> None:
    d = copy.deepcopy(TINY)
    d["study"] = "cli"
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "stages.plan_table", str(tmp_path / "params.yaml")],
                       cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                                          "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "results/cli/plan.md").exists() and (tmp_path / "results/cli/plan.parquet").exists()
    d["runs"]["moe_r50"]["vary"] = ["expert_width", "experts"]  # top_k = 1 fixed: r_a = 0.5 unreachable
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "stages.plan_table", str(tmp_path / "params.yaml")],
                       cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                                          "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "add top_k to runs.moe_r50.vary" in r.stderr
