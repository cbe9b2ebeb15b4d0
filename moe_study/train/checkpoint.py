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

Trust: `latest.json` also records the sha256 of every file of the step directory, checked before
anything is loaded; a damaged (truncated, flipped) checkpoint is skipped with a warning and the run
starts fresh (the previous steps were deleted when it was written), never a traceback on every retry.
Both engines load with `weights_only=True` (tensors and plain containers only: the loop's numpy RNG
state is stored as tensors, see `to_safe`; DeepSpeed's reader is swapped for a weights-only one that
allows three named DeepSpeed record classes), so a checkpoint file cannot run code.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_study.hashing import sha256_file, sha256_json
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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely (damaged, or not in the weights-only format)."""


def to_safe(obj: Any) -> Any:
    """`obj` with numpy arrays and scalars as tensors, so `torch.load(weights_only=True)` reads it back.

    Why: the loop's client state holds numpy's RNG state (an ndarray); pickling it would force
    `weights_only=False`, and then any checkpoint file could run code when loaded.
    """
    if isinstance(obj, np.ndarray | np.generic):
        arr = np.asarray(obj)
        raw = torch.frombuffer(bytearray(arr.tobytes()), dtype=torch.uint8) if arr.nbytes else torch.empty(0)
        return {"__ndarray__": raw, "dtype": arr.dtype.str, "shape": list(arr.shape),
                "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_safe(v) for v in obj)
    return obj


def from_safe(obj: Any) -> Any:
    """Inverse of to_safe: the same numpy arrays and scalars, bit for bit, and every tensor on the host.

    Why the host: the engine loads its file with `map_location` = the training device, so on a GPU the
    client state's tensors arrive in GPU memory, and both numpy and `torch.(cuda.)set_rng_state` take
    only CPU tensors (resuming on a GPU failed this way before)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict) and "__ndarray__" in obj:
        arr = np.frombuffer(obj["__ndarray__"].cpu().to(torch.uint8).numpy().tobytes(), dtype=np.dtype(obj["dtype"]))
        arr = arr.reshape(obj["shape"]).copy()
        return arr[()] if obj["scalar"] else arr
    if isinstance(obj, dict):
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(from_safe(v) for v in obj)
    return obj


def file_hashes(target: Path) -> dict[str, str]:
    """sha256 of every file under a step directory, by relative path (recorded in latest.json)."""
    return {p.relative_to(target).as_posix(): sha256_file(p) for p in sorted(target.rglob("*")) if p.is_file()}


def damage(target: Path, recorded: dict[str, str]) -> str | None:
    """What differs from the recorded hashes (a file missing, or with other bytes), or None."""
    for rel, sha in recorded.items():
        path = target / rel
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != sha:
            return f"{path} differs from its recorded sha256 (truncated or corrupt)"
    return None


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
        write_json(directory / LATEST, {"step": step, "dir": target.name, "engine": engine.name,
                                        "files": file_hashes(target)})
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
    if not target.is_dir():
        return None
    problem = damage(target, info.get("files") or {})
    if problem is not None:
        log.warning("not resuming from %s: %s; starting fresh", target, problem)
        return None
    return target


def load(target: Path, engine: Any) -> dict[str, Any] | None:
    """Restore the engine (model + optimizer) and return the loop's client state; None (a warning, a
    fresh start) when the checkpoint cannot be read safely."""
    try:
        client = engine.load(target)
    except CheckpointError as err:
        log.warning("not resuming from %s: %s; starting fresh", target, err)
        return None
    log.info("resumed from %s (step %d)", target, client["step"])
    return client
