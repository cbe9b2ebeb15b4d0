"""`snakemake --profile slurm` against a real SLURM: a one-node cluster on localhost
(slurm/localcluster.py: apt-get installs slurm-wlm + munge where missing; needs root, as CI has).

One project, the tiny study with training long enough to checkpoint mid-way, goes through:
1. the profile, with its dense train job cancelled (`scancel`) after a checkpoint: Snakemake fails;
2. a plain re-run: the missing outputs are rebuilt, train resumes from its checkpoint;
3. the dense run's outputs and checkpoints deleted, a plain re-run, its train job requeued
   (`scontrol requeue`) after a checkpoint: SLURM restarts it, it resumes, Snakemake carries on.
Every stage went through sbatch (job names `<rule>.<run>`), and the results equal a local
`snakemake -c2` run of the same study byte for byte.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, make_project, run

sys.path.insert(0, str(ROOT / "slurm"))
import localcluster  # noqa: E402

from moe_study.hashing import sha256_tree  # noqa: E402
from moe_study.registry import STAGES  # noqa: E402

pytestmark = pytest.mark.slow

if os.geteuid() != 0 and not shutil.which("slurmctld"):
    pytest.skip("a local SLURM needs root (apt-get install slurm-wlm munge, daemons as root)",
                allow_module_level=True)

CKPT_EVERY = 20
SLOW = copy.deepcopy(TINY)
SLOW["budget"]["compute"] *= 20  # dense: 240 steps, moe_r50: ~480; checkpoints every 20
SLOW["train"]["checkpoint_every"] = CKPT_EVERY
SLOW["train"]["device"] = "auto"  # a CPU-only cluster: no GPU may be requested

# identical under both engines and after a resume (train.json records resumed_from_step; provenance
# in JSON files names no paths or times, so those compare too)
SAME = ["results/ci/metrics.json", "results/ci/results.csv", "results/ci/plan.md", "work/eval/dense.json",
        "work/eval/moe_r50.json", "work/runs/dense/model", "work/runs/moe_r50/model"]
TIMING = {"tokens_per_s", "mfu"}  # wall-clock columns of steps.parquet: differ between any two runs


def assert_same_results(a: Path, b: Path) -> None:
    """Byte-identical results and weights; the training curves identical but for their timing columns."""
    import pyarrow.parquet as pq

    for rel in SAME:
        assert sha256_tree(a / rel) == sha256_tree(b / rel), rel
    for run_name in SLOW["runs"]:
        ta, tb = (pq.read_table(p / f"work/runs/{run_name}/steps.parquet") for p in (a, b))
        keep = [c for c in ta.schema.names if c not in TIMING]
        assert ta.num_rows > 0 and ta.select(keep).equals(tb.select(keep)), run_name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("slurm")
    t = time.monotonic()
    e = localcluster.start(d)
    print(f"SLURM up in {time.monotonic() - t:.1f} s")
    yield e
    localcluster.stop(d)


def senv(cluster_env: dict) -> dict:
    from conftest import env

    return {**env(), "SLURM_CONF": cluster_env["SLURM_CONF"]}


def sm(project: Path, cluster_env: dict, *args: str, check: bool = True, timeout: int = 900):
    r = subprocess.run(["snakemake", "--profile", "slurm", *args], cwd=project, env=senv(cluster_env),
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake --profile slurm failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-8000:]}")
    return r


def jobs(cluster_env: dict) -> list[tuple[str, str, str]]:
    """(id, name, state) of every job the cluster still knows (MinJobAge keeps finished ones)."""
    out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%j|%T"], env=senv(cluster_env),
                         capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")) for line in out.split()]


def wait_for_checkpoint(project: Path, run_name: str, proc: subprocess.Popen, at_least: int) -> int:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        for p in (project / "work/ckpt" / run_name).glob("*/latest.json"):
            try:
                step = json.loads(p.read_text())["step"]
            except (ValueError, KeyError, OSError):
                continue
            if step >= at_least:
                return step
        time.sleep(0.2)
    out = proc.communicate()[0] if proc.poll() is not None else ""
    raise AssertionError(f"no checkpoint of {run_name} at step >= {at_least}:\n{out[-4000:]}")


def job_id(cluster_env: dict, name: str, state: str = "RUNNING") -> str:
    """The id of the one job of that name in that state."""
    found = [j for j, n, s in jobs(cluster_env) if n == name and s == state]
    assert len(found) == 1, jobs(cluster_env)
    return found[0]


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_project(tmp_path_factory.mktemp("local"), SLOW)
    run(["snakemake", "-c2"], d)
    return d


@pytest.fixture(scope="module")
def slurm_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("onslurm"), SLOW)


def test_cancelled_train_job_is_rebuilt_by_a_plain_rerun_and_resumes(cluster, slurm_project: Path) -> None:
    t0 = time.monotonic()
    p = subprocess.Popen(["snakemake", "--profile", "slurm"], cwd=slurm_project, env=senv(cluster),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step = wait_for_checkpoint(slurm_project, "dense", p, CKPT_EVERY)
    subprocess.run(["scancel", job_id(cluster, "train.dense")], env=senv(cluster), check=True)
    out = p.communicate(timeout=900)[0]
    assert p.returncode != 0, out[-3000:]
    assert not (slurm_project / "work/runs/dense/train.json").exists()
    assert not (slurm_project / "results/ci/metrics.json").exists()
    sm(slurm_project, cluster)  # plain: no -R, no --rerun-incomplete by hand
    train = json.loads((slurm_project / "work/runs/dense/train.json").read_text())
    assert train["resumed_from_step"] is not None and train["resumed_from_step"] >= step, train
    print(f"SLURM study (cancel + re-run): {time.monotonic() - t0:.0f} s")


def test_every_stage_ran_through_sbatch(cluster, slurm_project: Path) -> None:
    want = {f"{s.name}.{r}" if s.per_run else s.name for s in STAGES for r in (SLOW["runs"] if s.per_run else [""])}
    done = {n for _, n, s in jobs(cluster) if s == "COMPLETED"}
    assert done == want, (want ^ done, jobs(cluster))
    assert {n for _, n, s in jobs(cluster) if s == "CANCELLED"} == {"train.dense"}
    # the profile keeps every job's SLURM log
    assert list((slurm_project / "work/logs/slurm/rule_train/moe_r50").glob("*.log"))
    # threads capped by the node: the "all cores" stages asked for the node's CPUs, no GPU anywhere
    out = subprocess.run(["scontrol", "show", "job", job_id(cluster, "train.moe_r50", "COMPLETED")],
                         env=senv(cluster), capture_output=True, text=True, check=True).stdout
    assert f"NumCPUs={os.cpu_count()}" in out and "gres/gpu" not in out, out


def test_slurm_results_equal_the_local_run(slurm_project: Path, local_ref: Path) -> None:
    assert_same_results(slurm_project, local_ref)


def test_up_to_date_after_the_slurm_run(cluster, slurm_project: Path) -> None:
    r = sm(slurm_project, cluster, "-n")
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-3000:]


def test_requeued_train_job_resumes_and_deleted_run_is_rebuilt(cluster, slurm_project: Path,
                                                               local_ref: Path) -> None:
    for rel in ("work/runs/dense/model", "work/runs/dense/steps.parquet", "work/runs/dense/train.json",
                "work/ckpt/dense"):
        path = slurm_project / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    p = subprocess.Popen(["snakemake", "--profile", "slurm"], cwd=slurm_project, env=senv(cluster),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step = wait_for_checkpoint(slurm_project, "dense", p, CKPT_EVERY)
    jid = job_id(cluster, "train.dense")
    subprocess.run(["scontrol", "requeue", jid], env=senv(cluster), check=True)
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-6000:]
    train = json.loads((slurm_project / "work/runs/dense/train.json").read_text())
    assert train["resumed_from_step"] is not None and train["resumed_from_step"] >= step, train
    # the same job, restarted by SLURM (the other completed train.dense is the re-run of the first test)
    assert jid in [j for j, n, s in jobs(cluster) if n == "train.dense" and s == "COMPLETED"], jobs(cluster)
    assert_same_results(slurm_project, local_ref)
