"""`dvc exp` on the tiny configuration: every run's params and final metrics in `dvc exp show`,
an experiment with `-S`, and a queued one run by `--run-all`.

One project is built and committed once (the baseline); the tests add experiments to it in order.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from conftest import TINY, make_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exp_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study built once, its results committed: the baseline of every experiment below."""
    d = make_project(tmp_path_factory.mktemp("exp"), TINY)
    run(["dvc", "repro"], d)
    run(["git", "add", "-A"], d)
    run(["git", "-c", "user.email=ci@example", "-c", "user.name=ci", "commit", "-qm", "baseline"], d)
    return d


def exp_show(project: Path) -> list[dict[str, str]]:
    out = run(["dvc", "exp", "show", "--csv", "--drop", r"work/.*|stages/.*|data/.*|kernels"], project).stdout
    return list(csv.DictReader(out.splitlines()))


def param(row: dict[str, str], key: str) -> str | None:
    """A params.yaml value of an `exp show` row (DVC prefixes the file when a metric has the same name)."""
    return row.get(f"params.yaml:{key}", row.get(key))


def test_dvc_exp_run_set_param_shows_every_runs_metrics(exp_project: Path) -> None:
    out = run(["dvc", "exp", "run", "-S", "++runs.dense.lr=0.002"], exp_project)
    ran = set(re.findall(r"Running stage '([^']+)'", out.stdout + out.stderr))
    assert ran == {"plan@dense", "train@dense", "evaluate@dense", "collect@dense", "export@dense", "plan_table",
                   "aggregate"}, ran
    rows = exp_show(exp_project)
    base = next(r for r in rows if r["rev"] not in ("workspace",) and r["typ"] == "baseline")
    exp = next(r for r in rows if r["typ"].startswith("branch") and param(r, "runs.dense.lr") == "0.002")
    for run_name in ("dense", "moe_r50"):  # every run's final metrics are columns
        for m in ("val_loss", "val_bpb", "cloze_acc", "choice_acc", "final_train_loss", "tokens_seen"):
            assert exp[f"{run_name}.{m}"] != "", (run_name, m)
    assert exp["dense.val_bpb"] != base["dense.val_bpb"]  # the edited run changed
    assert exp["moe_r50.val_bpb"] == base["moe_r50.val_bpb"]  # the other one did not re-run
    assert exp["_study.status"] == "ok" and param(exp, "runs.moe_r50.activation_rate") == "0.5"


def test_dvc_exp_queue_and_run_all(exp_project: Path) -> None:
    """A queued experiment runs in its own temporary workspace, restoring unchanged stages from the cache."""
    run(["dvc", "exp", "run", "--queue", "-S", "++runs.moe_r50.lr=0.005"], exp_project)
    out = run(["dvc", "exp", "run", "--run-all"], exp_project)
    # its temporary workspace restores the unchanged stages from the DVC cache: only the edited run re-runs
    ran = set(re.findall(r"Running stage '([^']+)'", out.stdout + out.stderr))
    assert ran == {"plan@moe_r50", "train@moe_r50", "evaluate@moe_r50", "collect@moe_r50", "export@moe_r50",
                   "plan_table", "aggregate"}, ran
    rows = exp_show(exp_project)
    queued = [r for r in rows if param(r, "runs.moe_r50.lr") == "0.005"]
    assert len(queued) == 1 and queued[0]["State"] == "Success", rows
    others = {r["moe_r50.val_bpb"] for r in rows if r not in queued}
    assert queued[0]["moe_r50.val_bpb"] not in others  # its own result, not a copy of another experiment's
    assert float(queued[0]["dense.val_bpb"]) > 0 and queued[0]["moe_r50.choice_acc"] != ""
