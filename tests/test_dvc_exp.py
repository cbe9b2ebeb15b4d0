"""`dvc exp` on the tiny configuration: every run's params and final metrics in `dvc exp show`,
an experiment with `-S`, and two queued ones run by `--run-all -j 2`, packed on one (fake) GPU.

One project is built and committed once (the baseline); the tests add experiments to it in order.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import pytest
from conftest import TINY, make_project, run

from moe_study.train import gpu_slots

pytestmark = pytest.mark.slow


def exp_params() -> dict:
    """The tiny study, trained 8x longer (a few seconds per run): two queued experiments' train jobs overlap."""
    p = copy.deepcopy(TINY)
    p["budget"]["compute"] *= 8
    return p


@pytest.fixture(scope="module")
def exp_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study built once, its results committed: the baseline of every experiment below."""
    d = make_project(tmp_path_factory.mktemp("exp"), exp_params())
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


def test_dvc_exp_queue_and_run_all(exp_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued experiments run in their own temporary workspaces, restoring unchanged stages from the cache.
    Two at once (`-j 2`) with MOE_STUDY_GPU_SHARE=2 on one fake GPU: their train jobs overlap on GPU 0,
    each in its own slot (README "Several runs on one GPU")."""
    lrs = ("0.005", "0.004")
    for lr in lrs:
        run(["dvc", "exp", "run", "--queue", "-S", f"++runs.moe_r50.lr={lr}"], exp_project)
    locks = tmp_path / "locks"
    monkeypatch.setenv(gpu_slots.ENV_FAKE, "1")
    monkeypatch.setenv(gpu_slots.ENV_SHARE, "2")
    monkeypatch.setenv(gpu_slots.ENV_LOCK_DIR, str(locks))  # the queue's workspaces (temp copies) share it
    out = run(["dvc", "exp", "run", "--run-all", "-j", "2"], exp_project, timeout=1800)  # 2 experiments, 2 cores
    # their temporary workspaces restore the unchanged stages from the DVC cache: only the edited run re-runs
    ran = set(re.findall(r"Running stage '([^']+)'", out.stdout + out.stderr))
    assert ran == {"plan@moe_r50", "train@moe_r50", "evaluate@moe_r50", "collect@moe_r50", "export@moe_r50",
                   "plan_table", "aggregate"}, ran
    rows = exp_show(exp_project)
    queued = [r for r in rows if param(r, "runs.moe_r50.lr") in lrs]
    assert len(queued) == 2 and all(r["State"] == "Success" for r in queued), rows
    others = {r["moe_r50.val_bpb"] for r in rows if r not in queued}
    bpbs = {r["moe_r50.val_bpb"] for r in queued}
    assert len(bpbs) == 2 and not bpbs & others  # each its own result, not a copy of another experiment's
    assert all(float(r["dense.val_bpb"]) > 0 and r["moe_r50.choice_acc"] != "" for r in queued)

    events = [json.loads(x) for x in (locks / gpu_slots.JOURNAL).read_text().splitlines()]
    ends = {e["pid"]: e["time"] for e in events if e["event"] == "release"}
    trains = [e for e in events if e["event"] == "claim" and e["label"] == "train@moe_r50"]
    assert len(trains) == 2 and {(e["gpu"], e["share"]) for e in trains} == {(0, 2)}, trains
    a, b = trains
    assert {a["slot"], b["slot"]} == {0, 1}  # each its own slot
    assert a["claimed_at"] < ends[b["pid"]] and b["claimed_at"] < ends[a["pid"]], trains  # at once
