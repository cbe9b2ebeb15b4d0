"""The DAG replayed end to end by both engines on the tiny configuration.

Checks the spine's promises: `dvc repro` and `snakemake` both run the whole study; a second run
does nothing; editing one run's learning rate re-runs only that run's stages, adding a run adds
only its own stages; `dvc dag` and `snakemake --dag` have the same nodes and edges; both engines
produce byte-identical artefacts. `dvc exp` is checked in tests/test_dvc_exp.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import make_project, run

from moe_study.hashing import sha256_tree

pytestmark = pytest.mark.slow

STUDY_OUTS = ["results/ci/summary.md", "results/ci/results.csv", "results/ci/metrics.duckdb", "results/metrics.duckdb",
              "results/ci/loss_vs_activation.png", "results/ci/training_curves.png", "results/ci/expert_load.png",
              "results/ci/metrics.json", "results/ci/plan.md", "results/ci/plan.parquet",
              "results/ci/plan_metrics.json"]


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Path:
    from conftest import TINY

    d = make_project(tmp_path_factory.mktemp("dvc"), TINY)
    run(["dvc", "repro"], d)
    return d


@pytest.fixture(scope="module")
def smk_project(tmp_path_factory) -> Path:
    from conftest import TINY

    d = make_project(tmp_path_factory.mktemp("smk"), TINY)
    run(["snakemake", "-c2"], d)
    return d


def set_lr(project: Path, run_name: str, lr: float) -> None:
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["runs"][run_name]["lr"] = lr
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def dvc_nodes_edges(project: Path) -> tuple[set[str], set[tuple[str, str]]]:
    dot = run(["dvc", "dag", "--dot"], project).stdout
    nodes = set(re.findall(r'^"([^"]+)";$', dot, re.M))
    edges = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M))
    return nodes, edges


def snakemake_nodes_edges(project: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """Jobs of `snakemake --dag` named like DVC's stages (`train@dense`).

    Snakemake labels a job only with the wildcards its inputs do not already carry, so a per-run
    job without a `run:` line inherits the run of its upstream per-run job.
    """
    from moe_study.registry import BY_NAME

    dot = run(["snakemake", "--dag", "--forceall", "-q"], project).stdout
    rules: dict[str, str] = {}
    runs: dict[str, str] = {}
    for num, label in re.findall(r'^\s*(\d+)\[label = "([^"]+)"', dot, re.M):
        parts = label.split("\\n")
        rules[num] = parts[0]
        wc = dict(x.split(": ", 1) for x in parts[1:] if ": " in x)
        if "run" in wc:
            runs[num] = wc["run"]
    raw_edges = re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)
    parents: dict[str, list[str]] = {}
    for a, b in raw_edges:
        parents.setdefault(b, []).append(a)

    def run_of(num: str) -> str | None:
        if num not in runs:
            found = {run_of(p) for p in parents.get(num, []) if BY_NAME.get(rules[p]) and BY_NAME[rules[p]].per_run}
            assert len(found) == 1, (rules[num], found)
            runs[num] = found.pop()
        return runs[num]

    def name(num: str) -> str:
        s = BY_NAME.get(rules[num])
        return f"{rules[num]}@{run_of(num)}" if s and s.per_run else rules[num]

    nodes = {name(n) for n in rules if rules[n] != "all"}
    edges = {(name(a), name(b)) for a, b in raw_edges if "all" not in (rules[a], rules[b])}
    return nodes, edges


def test_dvc_repro_runs_the_study(dvc_project: Path) -> None:
    for f in STUDY_OUTS:
        assert (dvc_project / f).stat().st_size > 0, f
    table = (dvc_project / "results/ci/summary.md").read_text()
    assert "| dense |" in table and "| moe_r50 |" in table
    import duckdb

    con = duckdb.connect(str(dvc_project / "results/ci/metrics.duckdb"), read_only=True)
    rows = con.execute("SELECT run_id, kind, val_bpb, tokens_seen, total_params, cloze_items, choice_acc "
                       "FROM runs ORDER BY run_id").fetchall()
    assert [r[0] for r in rows] == ["dense", "moe_r50"]
    assert all(0 < r[2] < 16 for r in rows)  # bits per byte of a real model on English-like text
    assert rows[1][3] > rows[0][3]  # the MoE run reads more tokens at equal compute
    for r in rows:
        e = json.loads((dvc_project / f"work/eval/{r[0]}.json").read_text())
        assert r[2] == e["bpb"] and r[5] == e["tasks"]["cloze"]["items"] == 64 and r[6] == e["tasks"]["choice"]["acc"]
    assert con.execute("SELECT count(*) FROM steps").fetchone()[0] == sum(
        json.loads((dvc_project / f"work/runs/{r}/plan.json").read_text())["steps"] for r in ("dense", "moe_r50"))
    assert con.execute("SELECT run_id FROM moe_vs_dense").fetchall() == [("moe_r50",)]


def test_dvc_second_run_is_a_noop(dvc_project: Path) -> None:
    out = run(["dvc", "repro"], dvc_project)
    text = out.stdout + out.stderr
    assert "Running stage" not in text, text
    assert json.loads(run(["dvc", "status", "--json"], dvc_project).stdout) == {}


def touch_kernels_without_changing_a_source(project: Path) -> None:
    """What Python's first import (bytecode in kernels/__pycache__/) and a warm GPU machine receiving the
    working tree again do to kernels/: new entries and a directory mtime of now, every source unchanged."""
    cache = project / "kernels/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "experts.cpython-312.pyc").write_bytes(b"not a source")
    os.utime(project / "kernels")


def test_dvc_ignores_bytecode_beside_the_kernels(dvc_project: Path) -> None:
    """kernels/ is a directory dep of train: without .dvcignore, bytecode written there re-ran every run."""
    touch_kernels_without_changing_a_source(dvc_project)
    assert json.loads(run(["dvc", "status", "--json"], dvc_project).stdout) == {}


def test_snakemake_agrees_that_dvc_repro_is_up_to_date(dvc_project: Path) -> None:
    """After a full `dvc repro`, Snakemake wants nothing either (plan_table included)."""
    out = run(["snakemake", "-c2", "-n"], dvc_project)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout


def test_deleted_run_outputs_are_rebuilt_by_a_plain_rerun(dvc_project: Path, smk_project: Path) -> None:
    """A cancelled or deleted run is redone by the plain command of either engine, no -R or --force."""
    import shutil

    for d in (dvc_project, smk_project):
        shutil.rmtree(d / "work/runs/dense/model")
        (d / "work/runs/dense/train.json").unlink()
    jobs = run(["snakemake", "-c2", "-n", "--printshellcmds"], smk_project).stdout
    assert "python -m stages.train --run dense" in jobs, jobs
    before = sha256_tree(smk_project / "work/runs/moe_r50/model")
    out = run(["dvc", "repro"], dvc_project)
    # DVC rebuilds a deleted output by re-running its stage or, when its run cache holds that exact run
    # (same inputs, params and code), by checking the cached outputs out: either way, the same bytes
    log = out.stdout + out.stderr
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run, checking out outputs", log))
    assert "train@dense" in ran | restored and "train@moe_r50" not in ran, log[-3000:]
    assert (dvc_project / "work/runs/dense/train.json").exists()
    assert (dvc_project / "work/runs/dense/model/model.safetensors").exists()
    run(["snakemake", "-c2"], smk_project)
    assert (smk_project / "work/runs/dense/train.json").exists()
    assert sha256_tree(smk_project / "work/runs/moe_r50/model") == before  # the other run was left alone


def test_dvc_lr_edit_reruns_only_that_run(dvc_project: Path) -> None:
    set_lr(dvc_project, "moe_r50", 1e-3)
    status = json.loads(run(["dvc", "status", "--json"], dvc_project).stdout)
    # plan@moe_r50 reads runs.moe_r50 as a whole, so DVC lists it; its output stays identical
    # plan_table reads `runs` as a whole too (its table is unchanged)
    assert set(status) == {"plan@moe_r50", "train@moe_r50", "collect@moe_r50", "plan_table", "aggregate"}, status
    out = run(["dvc", "repro"], dvc_project)
    ran = set(re.findall(r"Running stage '([^']+)'", out.stdout + out.stderr))
    assert ran == {"plan@moe_r50", "train@moe_r50", "evaluate@moe_r50", "collect@moe_r50", "export@moe_r50",
                   "plan_table", "aggregate"}, ran


def test_dvc_adding_a_run_leaves_the_other_runs_alone(dvc_project: Path) -> None:
    """Incremental aggregation: a new run brings its own stages and the union, nothing of the others."""
    before = (dvc_project / "params.yaml").read_text()
    p = yaml.safe_load(before)
    p["runs"]["dense_b"] = {"kind": "dense", "seed": 9}
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        status = json.loads(run(["dvc", "status", "--json"], dvc_project).stdout)
    finally:
        (dvc_project / "params.yaml").write_text(before)
    assert set(status) == {f"{s}@dense_b" for s in ("plan", "replay", "train", "evaluate", "collect", "export")} | {
        "plan_table", "aggregate"}, status


def test_snakemake_runs_the_study(smk_project: Path) -> None:
    for f in STUDY_OUTS:
        assert (smk_project / f).stat().st_size > 0, f


def test_snakemake_second_run_is_a_noop(smk_project: Path) -> None:
    out = run(["snakemake", "-c2", "-n"], smk_project)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout


def test_snakemake_ignores_kernels_directory_mtime(smk_project: Path) -> None:
    """Snakemake's inputs are kernels/'s source files: a new directory mtime re-ran every finished train
    job on the GPU machine's second call of a loan, though no source had changed."""
    touch_kernels_without_changing_a_source(smk_project)
    out = run(["snakemake", "-c2", "-n"], smk_project)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout


def test_snakemake_lr_edit_reruns_only_that_run(smk_project: Path) -> None:
    set_lr(smk_project, "dense", 1e-3)
    jobs = run(["snakemake", "-c2", "-n", "--printshellcmds"], smk_project).stdout
    cmds = set(re.findall(r"python -m stages\.(\w+(?: --run \w+)?)", jobs))
    assert cmds == {"plan --run dense", "replay --run dense", "train --run dense", "evaluate --run dense",
                    "collect --run dense", "export --run dense", "plan_table", "aggregate"}, jobs


def test_engines_build_identical_artefacts(dvc_project: Path, smk_project: Path) -> None:
    """Same inputs and seed: both engines' work/ outputs agree byte for byte (runs not edited above)."""
    from moe_study.hashing import sha256_tree

    for rel in ["work/corpus", "work/tokens", "work/dedupe", "work/split", "work/tasks", "work/runs/dense/plan.json",
                "work/runs/dense/replay.json", "work/runs/moe_r50/plan.json"]:
        assert sha256_tree(dvc_project / rel) == sha256_tree(smk_project / rel), rel


def test_dvc_and_snakemake_dags_are_equal(tmp_path: Path) -> None:
    from conftest import TINY

    d = make_project(tmp_path, TINY)
    dvc_nodes, dvc_edges = dvc_nodes_edges(d)
    smk_nodes, smk_edges = snakemake_nodes_edges(d)
    assert dvc_nodes == smk_nodes
    assert dvc_edges == smk_edges
    assert "train@moe_r50" in dvc_nodes and ("collect@dense", "aggregate") in dvc_edges
    assert {("tasks", "evaluate@moe_r50"), ("evaluate@dense", "collect@dense")} <= dvc_edges


def test_dvc_sees_the_training_curves(dvc_project: Path) -> None:
    """dvclive's summary is a (cached) DVC metric and its TSVs are plots: `dvc exp show` / `dvc plots` read them."""
    shown = run(["dvc", "exp", "show", "--json"], dvc_project).stdout
    assert "work/runs/dense/dvclive/metrics.json" in shown and "final_train_loss" in shown, shown[:2000]
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], dvc_project).stdout)
    flat = json.dumps(metrics)
    assert "work/runs/moe_r50/dvclive/metrics.json" in flat and "load_entropy" in flat
    plots = run(["dvc", "plots", "show", "--json"], dvc_project).stdout
    assert "dvclive/plots/metrics/train/loss.tsv" in plots
