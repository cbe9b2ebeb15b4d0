"""Process layout of a training run: the ranks torchrun / DeepSpeed set, the GPU count check and
the relaunch of the train stage under torchrun when `train.gpus` > 1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from moe_study.config.schema import TrainConfig

log = logging.getLogger("stages.train")


class LaunchError(ValueError):
    """A process layout that cannot run (the message names the field)."""


def check_visible_gpus(cfg: TrainConfig) -> None:
    """train.gpus against the CUDA devices this process sees, before torchrun starts one process per GPU.

    Without it, too large a train.gpus starts N processes of which the extra ones die in
    torch.cuda.set_device with "invalid device ordinal" (or hang the others in the NCCL rendezvous).
    CPU runs (train.device cpu, or auto without CUDA) are processes, not GPUs: not checked.
    device_count() reads the count without creating a CUDA context in this launcher process.
    """
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return
    visible = torch.cuda.device_count()
    if cfg.gpus > visible:
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise LaunchError(f"train.gpus={cfg.gpus} but {visible} CUDA device(s) are visible"
                         f"{f' (CUDA_VISIBLE_DEVICES={where})' if where is not None else ''}: "
                         f"lower train.gpus or use train.device: cpu")


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[003-004,7]` -> gpu003), by `scontrol show hostnames`
    where it is available, else by hand."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head, _, rest = nodelist.partition("[")
    if not rest:
        return nodelist.split(",")[0]
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return head + first


def slurm_rank_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed rank layout of an `srun` task: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first node of the step and the job
    id. Empty where a launcher already set RANK, or outside a multi-task SLURM step."""
    e = os.environ if environ is None else environ
    if "RANK" in e or "SLURM_PROCID" not in e or int(e.get("SLURM_NTASKS", e.get("SLURM_NPROCS", "1"))) <= 1:
        return {}
    nodes = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST", "localhost")
    return {
        "RANK": e["SLURM_PROCID"],
        "WORLD_SIZE": e.get("SLURM_NTASKS", e.get("SLURM_NPROCS", "1")),
        "LOCAL_RANK": e.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": e.get("SLURM_NTASKS_PER_NODE", e.get("SLURM_STEP_TASKS_PER_NODE", "1")).split("(")[0],
        "MASTER_ADDR": e.get("MASTER_ADDR") or _first_host(nodes),
        "MASTER_PORT": e.get("MASTER_PORT") or str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000),
    }


def relaunch_under_torchrun(argv: list[str]) -> int | None:
    """`train.gpus: N > 1` outside a launcher: run this same command under torchrun, one process per GPU.
    Under `srun` with several tasks (a multi-node job), each task is one rank: the layout is taken
    from SLURM's environment (slurm_rank_env) and nothing is relaunched."""
    import argparse

    from moe_study.config.load import load_params
    from moe_study.config.schema import ParamsError

    os.environ.update(slurm_rank_env())
    if "WORLD_SIZE" in os.environ:
        return None
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--params", default="params.yaml")
    known, _ = ap.parse_known_args(argv)
    try:
        cfg = load_params(known.params).train
    except ParamsError:
        return None  # per_run_main reports it
    gpus = cfg.gpus
    if gpus <= 1:
        return None
    check_visible_gpus(cfg)
    # "--" ends torchrun's options: without it, its parser takes our --run for an abbreviation of --run-path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "--", "stages.train", *argv]
    log.info("train.gpus=%d: %s", gpus, " ".join(cmd))
    return subprocess.call(cmd)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun / the deepspeed launcher (1 process: 0, 1, 0);
    valid before torch.distributed is initialised (checkpoint pruning runs then)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))
