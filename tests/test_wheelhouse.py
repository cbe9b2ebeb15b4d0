"""The GPU wheelhouse leaves packages out (tools/gpu/wheelhouse.py `SKIP`): the runs must not need them.

A call to the lent GPU carries at most 64 MiB, so the wheelhouse drops corners of dvc's closure that a run
never reaches. Here every module those packages provide is made unimportable (a `sitecustomize` on
PYTHONPATH, so Snakemake's job processes inherit it), and Snakemake trains a tiny MoE run, dvclive outputs
included: if a dvclive or Snakemake upgrade starts importing one of them, this fails, not a GPU loan.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_project, run

BLOCKER = '''
import importlib.abc, os, sys
_BLOCKED = set(os.environ["MOE_TEST_BLOCKED_IMPORTS"].split(","))
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ImportError(f"{name} is left out of the GPU wheelhouse (tools/gpu/wheelhouse.py SKIP)")
sys.meta_path.insert(0, _Blocker())
'''


def wheelhouse():
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "tools/gpu/wheelhouse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dropped_imports() -> tuple[set[str], set[str]]:
    """(distributions SKIP drops from the closure, the top-level modules they provide)."""
    wh = wheelhouse()
    have = wh.image_packages()
    dropped = set(wh.closure(wh.roots(), have, skip={})) - set(wh.closure(wh.roots(), have))
    by_dist: dict[str, set[str]] = {}
    for module, dists in md.packages_distributions().items():
        for d in dists:
            by_dist.setdefault(wh.canonicalize_name(d), set()).add(module)
    return dropped, {m for d in dropped for m in by_dist.get(d, ())}


def test_skip_drops_what_it_says_and_keeps_what_runs_need() -> None:
    dropped, modules = dropped_imports()
    assert {"pygit2", "asyncssh", "cryptography", "celery", "kombu"} <= dropped
    assert not dropped & {"dvc", "dvclive", "dulwich", "scmrepo", "snakemake", "pydantic", "sqlalchemy"}
    assert {"pygit2", "celery", "kombu", "cryptography"} <= modules


def test_dvc_queue_keeps_the_experiment_queue_and_its_dependencies() -> None:
    wh = wheelhouse()
    have = wh.image_packages()
    plain, queue = set(wh.closure(wh.roots(), have)), set(wh.closure(wh.roots(), have, skip=wh.skip_for(True)))
    assert plain < queue and {"celery", "kombu", "billiard", "amqp", "vine", "dvc-task"} <= queue
    assert not queue & {"pygit2", "asyncssh", "pulp"}  # the other skips stand


@pytest.mark.slow
def test_a_run_trains_with_every_dropped_package_unimportable(tmp_path: Path, monkeypatch) -> None:
    from conftest import TINY

    _, modules = dropped_imports()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    project = make_project(tmp_path / "p", TINY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(project)]))
    monkeypatch.setenv("MOE_TEST_BLOCKED_IMPORTS", ",".join(sorted(modules)))
    probe = run([sys.executable, "-c", "import celery"], project, check=False)
    assert "left out of the GPU wheelhouse" in probe.stderr  # the blocker reaches child processes

    run(["snakemake", "-c2", "--scheduler", "greedy", "work/runs/moe_r50/train.json"], project)
    live = project / "work/runs/moe_r50/dvclive"
    metrics = json.loads((live / "metrics.json").read_text())
    assert metrics["train"]["loss"] > 0 and metrics["final_train_loss"] > 0 and "load_entropy" in metrics["train"]
    assert (live / "plots/metrics/train/loss.tsv").read_text().count("\n") > 1
