"""Carrying the lr grids' choice into the study file (moe_study/remote/lr_choice.py), on fake records."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY

from moe_study.config.load import load_params
from moe_study.remote import lr_choice

MOE = "kind: moe, activation_rate: 0.5, top_k: 1, vary: [expert_width, experts, top_k]"
RUNS = f"""runs:
  dense_s0: {{kind: dense, seed: 0, group: dense, lr_grid: [1.0e-3, 3.0e-3]}}
  dense_s1: {{kind: dense, seed: 1, group: dense, lr: 3.0e-3}}  # placeholder, kept comment
  moe_s0: {{{MOE}, seed: 0, group: moe, lr_grid: [1.0e-3, 3.0e-3]}}
  moe_b_s0: {{{MOE}, seed: 1, group: moe_b, lr: 3.0e-3}}
"""
VALIDATION = {"dense_s0_lr1e-3": 2.0, "dense_s0_lr3e-3": 2.5, "moe_s0_lr1e-3": 2.4, "moe_s0_lr3e-3": 2.2}


def study(tmp_path: Path) -> Path:
    head = {k: v for k, v in TINY.items() if k != "runs"}
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(head, sort_keys=False) + RUNS)
    return f


def fake_records(tmp_path: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    results = tmp_path / "results"
    for r in runs:
        d = results / "records" / r
        d.mkdir(parents=True)
        grp, lr = r.rsplit("_s0_lr", 1)
        row = {"run_id": r, "study": "ci", "grp": grp, "lr": float(lr), "validation_loss": VALIDATION[r],
               "validation_bpb": VALIDATION[r] / 2, "val_loss": 9.0, "val_bpb": 9.0}
        pq.write_table(pa.Table.from_pylist([row]), d / "run.parquet")
    monkeypatch.setattr(lr_choice, "done_runs", lambda p, res=None: sorted(runs))
    return results


def test_choice_waits_for_a_complete_grid_then_writes_the_followers(tmp_path: Path, monkeypatch) -> None:
    f = study(tmp_path)
    results = fake_records(tmp_path, ["dense_s0_lr1e-3", "dense_s0_lr3e-3", "moe_s0_lr1e-3"], monkeypatch)
    p = load_params(f)
    by = lr_choice.grids(p, results)
    assert by["dense"].best == 1e-3 and by["moe"].best is None  # moe's grid lacks its 3e-3 run
    assert {r["run"]: r["follows"] for r in lr_choice.assignments(p, by)} == {"dense_s1": "dense", "moe_b_s0": "moe"}
    pending = lr_choice.pending_runs(p, results)
    assert "not the 0.001 chosen on grid dense" in pending["dense_s1"]
    assert "not complete" in pending["moe_b_s0"]

    text = lr_choice.choose(f, results, write=True)  # the complete grid's follower only
    assert "dense_s1: {kind: dense, seed: 1, group: dense, lr: 1.0e-3}  # placeholder, kept comment" in f.read_text()
    assert load_params(f).runs["moe_b_s0"].lr == 3e-3 and "still waiting for their grid: moe_b_s0" in text
    assert "| dense | 1.000 | 0.001 | 1 | 2.0000 | 1.0000 | **chosen** |" in (results / "lr_choice.md").read_text()
    assert "At the edge of its grid" in text  # 1e-3 is the grid's lowest
    assert lr_choice.pending_runs(load_params(f), results).keys() == {"moe_b_s0"}

    results = fake_records(tmp_path / "b", list(VALIDATION), monkeypatch)
    lr_choice.choose(f, results, write=True)
    p = load_params(f)
    assert (p.runs["dense_s1"].lr, p.runs["moe_b_s0"].lr) == (1e-3, 3e-3) and not lr_choice.pending_runs(p, results)


def test_a_run_not_on_one_line_is_refused(tmp_path: Path, monkeypatch) -> None:
    f = study(tmp_path)
    f.write_text(f.read_text().replace("  dense_s1: {kind: dense, seed: 1, group: dense, lr: 3.0e-3}",
                                       "  dense_s1:\n    {kind: dense, seed: 1, group: dense, lr: 3.0e-3}"))
    before = f.read_text()
    results = fake_records(tmp_path, ["dense_s0_lr1e-3", "dense_s0_lr3e-3"], monkeypatch)
    with pytest.raises(lr_choice.LrChoiceError, match="run dense_s1 is not one line"):
        lr_choice.choose(f, results, write=True)
    assert f.read_text() == before
