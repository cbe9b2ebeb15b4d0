"""The pieces of the SLURM path that need no cluster: srun's rank layout mapped onto torch.distributed's,
the node limits read from `sinfo`, job names. The cluster itself: tests/test_slurm.py."""

from __future__ import annotations

import subprocess

import pytest

from moe_study import slurm
from moe_study.train.launch import slurm_rank_env

# what srun sets in task 9 of `--nodes=2 --ntasks-per-node=8` (2 nodes x 8 GPUs)
TASK_9 = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
          "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "4242"}


def test_srun_task_gets_the_torch_rank_layout() -> None:
    e = slurm_rank_env(TASK_9)
    assert e == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                 "MASTER_ADDR": "gpu003", "MASTER_PORT": "24242"}
    # every task of the job agrees on the rendezvous
    other = slurm_rank_env({**TASK_9, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert (other["MASTER_ADDR"], other["MASTER_PORT"], other["RANK"]) == ("gpu003", "24242", "0")


def test_no_layout_outside_a_multi_task_step_or_under_a_launcher() -> None:
    assert slurm_rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) == {}
    assert slurm_rank_env({**TASK_9, "RANK": "3"}) == {}  # torchrun / deepspeed already set it
    assert slurm_rank_env({}) == {}


def test_node_limits_from_sinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    out = "cpu*|64|256000|(null)\ncpu*|32|128000|(null)\ngpu|96|1024000|gpu:h100:8(S:0-1)\n"

    def fake(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(slurm.subprocess, "run", fake)
    slurm.cluster_limits.cache_clear()
    try:
        assert slurm.cluster_limits() == slurm.NodeLimits(cpus=32, mem_mb=128000, gpus=0)  # default partition
        assert slurm.cluster_limits("gpu") == slurm.NodeLimits(cpus=96, mem_mb=1024000, gpus=8)
        with pytest.raises(RuntimeError, match="no node in partition nope"):
            slurm.cluster_limits("nope")
    finally:
        slurm.cluster_limits.cache_clear()


def test_job_names() -> None:
    assert slurm.job_name("train", {"run": "moe_r50"}) == "train.moe_r50"
    assert slurm.job_name("aggregate", {}) == "aggregate"
