"""Several runs on one GPU (README "Several runs on one GPU"), tested on CPU with fake GPUs.

The claimer (moe_study/train/gpu_slots.py) gives each shareable one-GPU job a definite (GPU, slot) by
flock in a machine-wide lock directory; MOE_STUDY_FAKE_GPUS=N makes it act as if N GPUs existed while
the job runs on CPU. Unit tests drive it through `python -m moe_study.train.gpu_slots --hold S` in child
processes (a flock is per process); the slow test packs a small study under Snakemake and checks the
recorded claims against the jobs' timing and the outputs of the same runs built without packing. The
DVC queue is checked in tests/test_dvc_exp.py (test_dvc_exp_queue_and_run_all).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, make_project, run

from moe_study.train import gpu_slots


def holder_env(lock_dir: Path, fake: int, share: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_STUDY_")}
    return env | {"PYTHONPATH": str(ROOT), gpu_slots.ENV_LOCK_DIR: str(lock_dir), gpu_slots.ENV_FAKE: str(fake),
                  gpu_slots.ENV_SHARE: str(share)}


def hold(lock_dir: Path, seconds: float, fake: int = 1, share: int = 1) -> subprocess.Popen:
    """A process that claims a slot as a stage would, prints its record and holds the slot `seconds`."""
    return subprocess.Popen([sys.executable, "-m", "moe_study.train.gpu_slots", "--hold", str(seconds)],
                            env=holder_env(lock_dir, fake, share), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def record(p: subprocess.Popen) -> dict:
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return json.loads(line)


def wait_until_waiting(p: subprocess.Popen) -> None:
    """Until `p` logs that every slot is taken (its first attempt failed)."""
    for line in p.stderr:
        if "waiting for a GPU slot" in line:
            return
    raise AssertionError(f"never waited: {p.stdout.read()}")


def test_claims_spread_over_the_least_loaded_gpu(tmp_path: Path) -> None:
    """2 fake GPUs x 2 slots: GPU 0, GPU 1, then the emptier one (ties: the lowest), never a held slot."""
    holders = []
    try:
        for _ in range(4):
            holders.append(hold(tmp_path, 60, fake=2, share=2))
            holders[-1].rec = record(holders[-1])  # in turn: each claim sees the previous ones
        got = [(h.rec["gpu"], h.rec["slot"]) for h in holders]
        assert got == [(0, 0), (1, 0), (0, 1), (1, 1)], got
        assert all(h.rec["fake"] and h.rec["gpus"] == 2 and h.rec["share"] == 2 for h in holders)
        holders[1].kill()  # GPU 1 now has one job, GPU 0 two: the next claim goes to GPU 1's free slot
        holders[1].wait()
        nxt = hold(tmp_path, 60, fake=2, share=2)
        holders.append(nxt)
        rec = record(nxt)
        assert (rec["gpu"], rec["slot"]) == (1, 0), rec
    finally:
        for h in holders:
            h.kill()
            h.wait()
    claims = [e for e in gpu_slots.read_journal(tmp_path) if e["event"] == "claim"]
    assert [(e["gpu"], e["slot"]) for e in claims] == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 0)]


def test_a_second_claim_waits_until_the_first_exits(tmp_path: Path) -> None:
    """One GPU, share 1: the second job waits (and says so) until the first ends normally."""
    first = hold(tmp_path, 3)
    try:
        rec = record(first)
        assert rec["pid"] == first.pid and (rec["gpu"], rec["slot"], rec["gpus"], rec["share"]) == (0, 0, 1, 1)
        assert rec["device"] == "0" and rec["fake"] and rec["wait_seconds"] < 1.0
        second = hold(tmp_path, 0)
        wait_until_waiting(second)
        rec = record(second)
        assert (rec["gpu"], rec["slot"]) == (0, 0) and rec["wait_seconds"] > 0, rec
        second.wait(60)
    finally:
        first.kill()
        first.wait()
    # the release is journaled before the lock is dropped, a claim while the claimer holds the slot
    events = [(e["event"], e["pid"]) for e in gpu_slots.read_journal(tmp_path)]
    assert events == [("claim", first.pid), ("release", first.pid), ("claim", second.pid), ("release", second.pid)]


def test_a_killed_holder_frees_its_slot(tmp_path: Path) -> None:
    """kill -9 of the holder: the kernel drops its flock, the waiting job gets the slot (no stale lock)."""
    first = hold(tmp_path, 600)
    try:
        record(first)
        second = hold(tmp_path, 0)
        wait_until_waiting(second)
        time.sleep(1)
        assert second.poll() is None  # still waiting
        os.kill(first.pid, signal.SIGKILL)
        rec = record(second)
        assert (rec["gpu"], rec["slot"]) == (0, 0) and rec["wait_seconds"] >= 1.0
        second.wait(60)
    finally:
        first.kill()
        first.wait()
    # the killed holder never wrote its release: the journal is a log, the flock is the truth
    assert [e["event"] for e in gpu_slots.read_journal(tmp_path)] == ["claim", "claim", "release"]


def test_real_gpus_set_cuda_visible_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fake GPUs the claim names the GPU in CUDA_VISIBLE_DEVICES; a scheduler's list is respected
    (only its GPUs are candidates); no GPU at all (a CPU machine) claims and writes nothing."""
    monkeypatch.setattr(gpu_slots, "_HELD", None)
    base = {gpu_slots.ENV_LOCK_DIR: str(tmp_path / "locks"), gpu_slots.ENV_SHARE: "2"}
    env = dict(base)
    assert gpu_slots.claim("t", env, count=lambda: 0) is None and not (tmp_path / "locks").exists()
    try:
        c = gpu_slots.claim("t", env, count=lambda: 3)
        assert (c.gpu, c.device, c.slot, c.gpus, c.fake) == (0, "0", 0, 3, False) and env["CUDA_VISIBLE_DEVICES"] == "0"
        assert gpu_slots.current() is c and gpu_slots.claim("t", env) is c  # once per process
    finally:
        gpu_slots.release()
    # a scheduler gave this job GPUs 5 and 7 (SLURM: lock names carry the job id, its GPU numbers are its own)
    env = dict(base, CUDA_VISIBLE_DEVICES="5,7", SLURM_JOB_ID="42")
    try:
        c = gpu_slots.claim("t", env, count=lambda: 8)
        assert (c.gpu, c.device, c.gpus) == (0, "5", 2) and env["CUDA_VISIBLE_DEVICES"] == "5"
        assert (tmp_path / "locks" / "slurm42-gpu5.slot0.lock").exists()
    finally:
        gpu_slots.release()
    assert gpu_slots.candidates({"CUDA_VISIBLE_DEVICES": ""}) == ([], "gpu", False)
    with pytest.raises(ValueError, match="MOE_STUDY_GPU_SHARE"):
        gpu_slots.share_from_env({gpu_slots.ENV_SHARE: "0"})


def test_neither_the_share_nor_a_claim_is_a_param() -> None:
    """Where a job runs cannot change what it computes: the share and the claim are no DVC param (nor in the
    train section, the checkpoint key); the claimer is code of the two shareable stages only."""
    from moe_study.config.schema import TrainConfig
    from moe_study.registry import STAGES

    assert {s.name for s in STAGES if "moe_study/train/gpu_slots.py" in s.code_files} == {"train", "evaluate"}
    assert {s.name for s in STAGES if s.resources.gpu_shareable} == {"train", "evaluate"}
    assert "gpu_share" not in (ROOT / "dvc.yaml").read_text() and "gpu_share" not in TrainConfig.model_fields


# ------------------------------------------------------------------------------ Snakemake, packed
PACKED_RUNS = {"dense": {"kind": "dense"}, "dense_s1": {"kind": "dense", "seed": 11},
               "moe_r50": TINY["runs"]["moe_r50"], "moe_r50_s1": {**TINY["runs"]["moe_r50"], "seed": 11}}


def packed_params() -> dict:
    """The tiny study with four runs, each trained 8x longer (a few seconds), so packed jobs overlap."""
    import copy

    p = copy.deepcopy(TINY)
    p["runs"] = {name: copy.deepcopy(spec) for name, spec in PACKED_RUNS.items()}  # no shared lists: no YAML anchors
    p["budget"]["compute"] *= 8
    p["eval"] |= {"bootstrap": 20, "max_tokens": 4000, "task_items": 16}
    return p


def test_snakemake_packs_two_jobs_per_fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`snakemake -c 4 --config gpu_share=2 --resources gpu_slots=4` with 2 fake GPUs: train and evaluate
    jobs run concurrently, at most 2 per GPU, on both GPUs; every model and evaluation is byte-identical
    to the same run built alone without packing (no claim, no `gpu_claim` in train.json)."""
    import shutil

    from moe_study.hashing import sha256_tree

    packed = make_project(tmp_path / "packed", packed_params())
    run(["snakemake", "-c2", "--until", "replay", "tasks"], packed)  # the shared inputs, built once
    alone = tmp_path / "alone"
    shutil.copytree(packed, alone, symlinks=True)

    locks = tmp_path / "locks"
    monkeypatch.setenv(gpu_slots.ENV_FAKE, "2")
    monkeypatch.setenv(gpu_slots.ENV_LOCK_DIR, str(locks))
    out = run(["snakemake", "-c", "4", "--config", "gpu_share=2", "--resources", "gpu_slots=4",
               "--until", "evaluate"], packed)
    monkeypatch.delenv(gpu_slots.ENV_FAKE)
    run(["snakemake", "-c1", "--until", "evaluate"], alone)

    spans = gpu_slots.held_spans(locks)
    assert sorted(s["label"] for s in spans) == sorted(f"{st}@{r}" for st in ("train", "evaluate") for r in PACKED_RUNS)
    trains = [s for s in spans if s["label"].startswith("train@")]
    assert gpu_slots.most_at_once(trains) >= 2, (trains, out.stderr[-3000:])  # (a) concurrent
    for gpu in (0, 1):  # (b) never more than 2 per GPU, each in its own slot
        on = [s for s in spans if s["gpu"] == gpu]
        assert gpu_slots.most_at_once(on) <= 2
        for a in on:
            for b in on:
                if a is not b and a["claimed_at"] < b["end"] and b["claimed_at"] < a["end"]:
                    assert a["slot"] != b["slot"], (a, b)
    assert {s["gpu"] for s in trains} == {0, 1}  # (c) both GPUs
    assert all(s["share"] == 2 and s["gpus"] == 2 and s["fake"] for s in spans)

    for r in PACKED_RUNS:  # (d) packed == alone, byte for byte
        t_packed = json.loads((packed / f"work/runs/{r}/train.json").read_text())
        t_alone = json.loads((alone / f"work/runs/{r}/train.json").read_text())
        claim = t_packed["gpu_claim"]
        span = next(s for s in trains if s["label"] == f"train@{r}")
        assert (claim["gpu"], claim["slot"], claim["pid"]) == (span["gpu"], span["slot"], span["pid"])
        assert "gpu_claim" not in t_alone  # no GPU, no fake GPUs: the claimer did nothing
        assert t_packed["provenance"] == t_alone["provenance"]
        assert t_packed["final_train_loss"] == t_alone["final_train_loss"]
        assert sha256_tree(packed / f"work/runs/{r}/model") == sha256_tree(alone / f"work/runs/{r}/model"), r
        docs = f"work/eval/{r}.docs.parquet"
        assert (packed / docs).read_bytes() == (alone / docs).read_bytes(), docs
        e_packed = json.loads((packed / f"work/eval/{r}.json").read_text())
        e_alone = json.loads((alone / f"work/eval/{r}.json").read_text())
        assert e_packed.pop("gpu_claim")["gpu"] in (0, 1) and e_packed == e_alone, r


def test_a_packed_gpu_job_takes_its_share_of_the_cores() -> None:
    """threads 0 (all cores) in each of S jobs on a GPU would oversubscribe the CPU S-fold (their OpenMP
    barriers starved the launching threads on the H200): a real claim gets cores // (GPUs x share); an
    explicit train.threads, no claim (a CPU study) and fake GPUs (CPU tests: threads are arithmetic) keep
    what they had."""
    def claim(gpus: int, share: int, fake: bool = False) -> gpu_slots.Claim:
        return gpu_slots.Claim(gpu=0, device="0", slot=0, gpus=gpus, share=share, fake=fake, wait_seconds=0.0,
                               claimed_at=0.0, pid=1, label="t", lock_dir="")

    assert gpu_slots.cpu_threads(0, claim(1, 4), cores=16) == 4
    assert gpu_slots.cpu_threads(0, claim(2, 4), cores=16) == 2
    assert gpu_slots.cpu_threads(0, claim(1, 32), cores=16) == 1
    assert gpu_slots.cpu_threads(3, claim(1, 4), cores=16) == 3  # train.threads given: kept
    assert gpu_slots.cpu_threads(0, claim(1, 4, fake=True), cores=16) == 16
    assert gpu_slots.current() is None and gpu_slots.cpu_threads(0, cores=16) == 16  # no claim


def test_finishing_a_run_comes_before_starting_another() -> None:
    """Snakemake's `priority` from the registry: when a slot frees, a trained run's evaluate (then export,
    collect) goes before the next train, so a study stopped by a time limit keeps whole runs (on the H200
    4 slots went to new trains while 3 trained runs waited for evaluation until the call ended)."""
    from moe_study.registry import STAGES

    prio = {s.name: s.priority for s in STAGES}
    assert min(prio["evaluate"], prio["export"], prio["collect"]) > prio["train"]
    assert "priority: _s.priority" in (ROOT / "Snakefile").read_text()


def test_most_at_once_counts_a_killed_job_as_still_holding() -> None:
    """A job killed by a time limit writes no release (end nan): it held its slot to the journal's end."""
    nan = float("nan")
    spans = [{"claimed_at": 0.0, "end": nan}, {"claimed_at": 1.0, "end": 2.0}, {"claimed_at": 3.0, "end": 4.0}]
    assert gpu_slots.most_at_once(spans) == 2
    assert gpu_slots.most_at_once([{"claimed_at": 0.0, "end": 1.0}, {"claimed_at": 1.5, "end": nan}]) == 1


def test_the_gpu_count_is_asked_once_per_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each packed job used to start a second torch (and CUDA) only to count the GPUs: the first job's
    count is kept in the lock directory for the machine's boot; a new boot asks again."""
    asked = []

    def count() -> int:
        asked.append(1)
        return 3

    monkeypatch.setattr(gpu_slots, "_boot_id", lambda: "boot-a")
    assert gpu_slots.count_gpus_once(tmp_path, count) == 3 and gpu_slots.count_gpus_once(tmp_path, count) == 3
    assert len(asked) == 1
    monkeypatch.setattr(gpu_slots, "_boot_id", lambda: "boot-b")
    assert gpu_slots.count_gpus_once(tmp_path, count) == 3 and len(asked) == 2
    monkeypatch.setattr(gpu_slots, "_boot_id", lambda: "")  # no boot id: asked every time, nothing kept
    gpu_slots.count_gpus_once(tmp_path / "x", count)
    assert len(asked) == 3 and not (tmp_path / "x").exists()
    monkeypatch.setattr(gpu_slots, "_boot_id", lambda: "boot-c")  # no GPU: nothing kept (a CPU machine)
    assert gpu_slots.count_gpus_once(tmp_path / "y", lambda: 0) == 0 and not (tmp_path / "y").exists()
