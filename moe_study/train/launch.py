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


def relaunch_under_torchrun(argv: list[str]) -> int | None:
    """`train.gpus: N > 1` outside a launcher: run this same command under torchrun, one process per GPU."""
    import argparse

    from moe_study.config.load import load_params
    from moe_study.config.schema import ParamsError

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
