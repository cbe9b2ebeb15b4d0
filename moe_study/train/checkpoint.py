"""Resumable training: where a run's checkpoints live, and how one is written and found after a kill.

Why outside the stage's outputs: DVC deletes a stage's declared outputs before it re-runs the
stage, so a checkpoint under work/runs/<run>/model/ would be gone exactly when it is needed.
Checkpoints live in work/ckpt/<run>/<key>/, where the key hashes everything that determines the
training (plan, replay and token hashes, the train/run params, the code), so a changed
configuration starts fresh instead of resuming a stale state (and removes the stale keys'
checkpoints). Fields that do not change the numbers (log_every, checkpoint_every) are left out of
the key.

Layout and kill-safety: each checkpoint is a directory `step_<N>/` written by every process (the
engine's own files: DeepSpeed's checkpoint or the torch engine's state, plus the loop's client state:
step, loader position, RNG states, history). Only after all of it is on disk does rank 0 point
`latest.json` at it (an atomic rename) and delete the previous step directories. A kill at any
moment leaves `latest.json` naming a complete checkpoint (or none), and a half-written step
directory is ignored and removed by the next save.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_study.hashing import sha256_json
from moe_study.io import WORK, read_json, write_json
from moe_study.train.launch import dist_env

LATEST = "latest.json"
NOT_IN_KEY = ("log_every", "checkpoint_every")

log = logging.getLogger("stages.train")


def checkpoint_key(inputs: dict[str, str], train_params: dict[str, Any], run_params: dict[str, Any],
                   code_sha256: str) -> str:
    params = {k: v for k, v in train_params.items() if k not in NOT_IN_KEY}
    return sha256_json({"inputs": inputs, "train": params, "run": run_params, "code": code_sha256})[:20]


def checkpoint_dir(run: str, key: str, work: Path = WORK) -> Path:
    return work / "ckpt" / run / key


def prune_stale_keys(directory: Path) -> list[Path]:
    """Remove the run's checkpoints of other keys (an older config or code): they can never resume
    this run, and left alone they would fill the disk one full model + optimizer state per edit.
    Rank 0 only; the stage's lock (DVC, Snakemake) means no other config of this run is training."""
    if dist_env()[0] != 0 or not directory.parent.is_dir():
        return []
    stale = [d for d in sorted(directory.parent.iterdir()) if d.is_dir() and d.name != directory.name]
    for d in stale:
        log.info("removing stale checkpoints %s (another config or code version)", d)
        shutil.rmtree(d, ignore_errors=True)
    return stale


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(directory: Path, engine: Any, step: int, client: dict[str, Any]) -> Path:
    """Write checkpoint `step` (all processes call this), then point latest.json at it (rank 0)."""
    target = directory / f"step_{step:09d}"
    if dist_env()[0] == 0:
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    _barrier()
    engine.save(target, client)
    _barrier()
    if dist_env()[0] == 0:
        write_json(directory / LATEST, {"step": step, "dir": target.name, "engine": engine.name})
        for old in directory.glob("step_*"):
            if old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return target


def latest(directory: Path, engine: str) -> Path | None:
    """The complete checkpoint latest.json names, or None (no checkpoint, or one `engine` cannot load:
    `train.engine: auto` is DeepSpeed on a GPU and torch on the CPU, under the same key)."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    info = read_json(pointer)
    if info.get("engine") != engine:
        log.warning("not resuming from %s: written by the %s engine, this run uses %s", directory,
                    info.get("engine"), engine)
        return None
    target = directory / info["dir"]
    return target if target.is_dir() else None


def load(target: Path, engine: Any) -> dict[str, Any]:
    """Restore the engine (model + optimizer) and return the loop's client state."""
    client = engine.load(target)
    log.info("resumed from %s (step %d)", target, client["step"])
    return client
