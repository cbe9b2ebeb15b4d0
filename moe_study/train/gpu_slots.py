"""Several runs on one GPU: which GPU (and which of its slots) a shareable one-GPU job runs on.

Why: Snakemake only *counts* `gpu_slots` (`--config gpu_share=S --resources gpu_slots=G*S`) and DVC's
queue (`dvc exp run --run-all -j N`) counts nothing; neither tells a job which GPU is its own, so every
job would open cuda:0. A shareable stage (train with `train.gpus: 1`, evaluate) calls `claim_for_stage`
at start-up, before CUDA is initialised; it takes one of the machine's G x S slots, preferring the
least-loaded GPU, and sets CUDA_VISIBLE_DEVICES to that GPU, so the job's `cuda` device is its own.

How: one lock file per (GPU, slot) in a lock directory shared by every workspace of the machine (DVC's
queued experiments run in temporary copies of the repository): default `<tmp>/moe_study-gpu-slots-<uid>`,
or MOE_STUDY_GPU_LOCK_DIR. A slot is held by an exclusive non-blocking `fcntl.flock` for the life of the
process: the kernel drops it when the process ends, kill -9 included, so no slot is ever stale. The
choice itself happens under a short exclusive lock on `choose.lock`, so the loads it compares are
exact. When every slot is taken the job waits, logging why at most once a minute. Each claim and each
normal release is one line of `claims.jsonl` in the lock directory (what ran where, and when).

The share S: the environment variable MOE_STUDY_GPU_SHARE (default 1, one job per GPU). The Snakefile
sets it from `--config gpu_share=S`; for DVC set it in the environment of `dvc exp run` / `dvc repro`.
It is deliberately not a params.yaml value: where a job runs must not change what it computes, so it
must not be a DVC param or a checkpoint-key field (and no claim is written into the model's files).
This module itself is code of train and evaluate (their code identity, like any file they import).

The GPUs: CUDA_VISIBLE_DEVICES when it is set (a scheduler's or the user's choice: only those are
candidates; under SLURM the lock names carry the job id, since SLURM may renumber each job's GPUs from
0), else the count torch sees, read in a child process once per boot (count_gpus_once; a CUDA call here
would freeze this process's view of CUDA_VISIBLE_DEVICES before it is set). None (a CPU machine, a CPU
build of torch): nothing is claimed and nothing is recorded, so a CPU study's outputs are unchanged.

MOE_STUDY_FAKE_GPUS=N (tests, CI): act as if N GPUs existed; the claim is made and recorded as for real
GPUs, but CUDA_VISIBLE_DEVICES is left alone (the job runs where it would have: on CPU in CI).

The claim is recorded in train.json / work/eval/<run>.json as `gpu_claim` (GPU, slot, wait): beside the
provenance, never in the model's config.json, so a packed run's model is byte-identical to the same run
alone. `python -m moe_study.train.gpu_slots` shows who holds which slot.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_study.io import write_json

ENV_SHARE = "MOE_STUDY_GPU_SHARE"
ENV_FAKE = "MOE_STUDY_FAKE_GPUS"
ENV_LOCK_DIR = "MOE_STUDY_GPU_LOCK_DIR"
JOURNAL = "claims.jsonl"
POLL_S = 0.5  # how often a waiting job retries
LOG_EVERY_S = 60.0  # how often a waiting job says so

log = logging.getLogger("stages.gpu_slots")


@dataclass(frozen=True)
class Claim:
    """A held (GPU, slot): `gpu` is the index among the candidates, `device` the CUDA_VISIBLE_DEVICES
    value it names (the same unless a scheduler restricted the GPUs)."""

    gpu: int
    device: str
    slot: int
    gpus: int
    share: int
    fake: bool
    wait_seconds: float
    claimed_at: float  # Unix time
    pid: int
    label: str
    lock_dir: str

    def record(self) -> dict[str, Any]:
        """What train.json / the evaluate output keep of it."""
        return {k: v for k, v in asdict(self).items() if k not in ("lock_dir", "label")}


_HELD: tuple[Claim, int] | None = None  # this process's claim and the descriptor that holds its lock


def current() -> Claim | None:
    """The claim this process holds (None: it claimed nothing, e.g. on a CPU machine)."""
    return _HELD[0] if _HELD is not None else None


# ------------------------------------------------------------------------------------------ settings
def _positive_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be a whole number >= 1")
    return value


def share_from_env(env: Mapping[str, str] = os.environ) -> int:
    """S, the jobs per GPU (MOE_STUDY_GPU_SHARE, default 1)."""
    return _positive_int(env, ENV_SHARE, 1) or 1


def lock_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The machine-wide lock directory: MOE_STUDY_GPU_LOCK_DIR, else one per user under the temp dir."""
    if env.get(ENV_LOCK_DIR):
        return Path(env[ENV_LOCK_DIR])
    return Path(tempfile.gettempdir()) / f"moe_study-gpu-slots-{os.getuid()}"


def _count_gpus() -> int:
    """torch.cuda.device_count(), asked in a child process: in this one it could initialise CUDA, after
    which setting CUDA_VISIBLE_DEVICES has no effect. A CPU build of torch has none (no child)."""
    try:
        import torch
    except ImportError:
        return 0
    if not torch.backends.cuda.is_built():
        return 0
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=300)
        return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.split() else 0
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def count_gpus_once(root: Path | None = None, count: Callable[[], int] = _count_gpus) -> int:
    """`count()` once per boot of the machine, kept in the lock directory (`gpu_count.json`).

    Why: asking torch in a child process costs every job a second torch import and a CUDA start-up
    (~5-10 s of each packed job's start on the H200, where 4 jobs start at once); the count of GPUs a
    machine has does not change until it reboots. Without a boot id (not Linux) it is asked every time."""
    boot = _boot_id()
    root = lock_dir() if root is None else root
    cache = root / "gpu_count.json"
    if boot:
        try:
            got = json.loads(cache.read_text())
            if got.get("boot_id") == boot and isinstance(got.get("count"), int):
                return got["count"]
        except (OSError, ValueError, AttributeError):
            pass
    n = count()
    if boot and n > 0:  # a machine without GPUs keeps no file (nothing is written where nothing is claimed)
        with contextlib.suppress(OSError, ValueError):
            _prepare(root)
            write_json(cache, {"boot_id": boot, "count": n})
    return n


def candidates(env: Mapping[str, str] = os.environ,
               count: Callable[[], int] | None = None) -> tuple[list[str], str, bool]:
    """(the devices a job may take, the lock-name namespace, fake?).

    Fake GPUs first (a test knob); then CUDA_VISIBLE_DEVICES as given (entries up to the first invalid
    one, as CUDA reads it); else the GPUs torch counts."""
    fake = _positive_int(env, ENV_FAKE, None)
    if fake is not None:
        return [str(i) for i in range(fake)], "fake-gpu", True
    namespace = f"slurm{env['SLURM_JOB_ID']}-gpu" if env.get("SLURM_JOB_ID") else "gpu"
    if "CUDA_VISIBLE_DEVICES" in env:
        devices = []
        for d in env["CUDA_VISIBLE_DEVICES"].split(","):
            d = d.strip()
            if not d or d.startswith("-"):
                break
            devices.append(d)
        return devices, namespace, False
    n = count() if count is not None else count_gpus_once(lock_dir(env))
    return [str(i) for i in range(n)], namespace, False


# ---------------------------------------------------------------------------------------- the claim
def _slot_path(root: Path, namespace: str, device: str, slot: int) -> Path:
    return root / f"{namespace}{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.slot{slot}.lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding `path`'s exclusive flock, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "?"
    return f"{h.get('label', '?')} (pid {h.get('pid', '?')})"


def _journal(root: Path, event: str, claim: Claim) -> None:
    """One line per event; a single O_APPEND write, so lines of concurrent jobs never interleave."""
    line = json.dumps({"event": event, "time": time.time(), "host": socket.gethostname(), **asdict(claim)}) + "\n"
    with contextlib.suppress(OSError):
        fd = os.open(root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read_journal(root: Path) -> list[dict]:
    """The journal's events, oldest first (what `python -m moe_study.train.gpu_slots` and the checks read)."""
    return [json.loads(x) for x in (root / JOURNAL).read_text().splitlines()]


def held_spans(root: Path) -> list[dict]:
    """Each claim of the journal with its `end` (the release its process wrote at exit; nan while held)."""
    events = read_journal(root)
    ends = {e["pid"]: e["time"] for e in events if e["event"] == "release"}
    return [{**e, "end": ends.get(e["pid"], float("nan"))} for e in events if e["event"] == "claim"]


def most_at_once(spans: list[dict]) -> int:
    """The most spans (held_spans rows) open at one time: how many jobs really shared the GPUs. A span
    without an end (its process was killed, or still runs) counts as held to the end of the journal."""
    ends = [s["end"] if s["end"] == s["end"] else float("inf") for s in spans]  # nan: no release written
    edges = sorted([(s["claimed_at"], 1) for s in spans] + [(e, -1) for e in ends])
    now = best = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def _prepare(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if root.stat().st_uid != os.getuid():
        raise ValueError(f"{root}: the GPU lock directory belongs to another user (set {ENV_LOCK_DIR})")


def _pick(root: Path, namespace: str, devices: list[str], share: int) -> tuple[int, int, int] | None:
    """(GPU index, slot, descriptor) of a free slot on the least-loaded GPU (ties: the lowest index),
    or None when all are taken. Called under choose.lock: no other claimer changes the slots meanwhile
    (holders can only free theirs), so the loads compared are exact."""
    best: tuple[int, int, int, int] | None = None  # (load, gpu, slot, fd)
    for i, device in enumerate(devices):
        free: list[tuple[int, int]] = []
        for k in range(share):
            fd = _try_lock(_slot_path(root, namespace, device, k))
            if fd is not None:
                free.append((k, fd))
        for _, fd in free[1:]:
            os.close(fd)
        if not free:
            continue
        load = share - len(free)
        if best is None or load < best[0]:
            if best is not None:
                os.close(best[3])
            best = (load, i, *free[0])
        else:
            os.close(free[0][1])
    return None if best is None else best[1:]


def claim(label: str, env: MutableMapping[str, str] | None = None, *, poll_s: float = POLL_S,
          log_every_s: float = LOG_EVERY_S, count: Callable[[], int] | None = None) -> Claim | None:
    """Take a (GPU, slot) for this process, waiting while all are taken; None where there is no GPU.

    Sets CUDA_VISIBLE_DEVICES in `env` (os.environ) to the GPU (not for fake GPUs). Idempotent: a
    second call in one process returns the first claim. Call it before anything initialises CUDA."""
    global _HELD
    if _HELD is not None:
        return _HELD[0]
    env = os.environ if env is None else env
    share = share_from_env(env)
    devices, namespace, fake = candidates(env, count)
    if not devices:
        return None
    torch = sys.modules.get("torch")
    if not fake and torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("gpu_slots.claim: CUDA is already initialised in this process; claim a GPU first")
    root = lock_dir(env)
    _prepare(root)
    t0, last_log = time.monotonic(), None
    while True:
        with open(root / "choose.lock", "a") as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            picked = _pick(root, namespace, devices, share)
            if picked is not None:  # recorded under the mutex: the journal lists claims in the order made
                gpu, slot, fd = picked
                c = Claim(gpu=gpu, device=devices[gpu], slot=slot, gpus=len(devices), share=share, fake=fake,
                          wait_seconds=round(time.monotonic() - t0, 3), claimed_at=time.time(), pid=os.getpid(),
                          label=label, lock_dir=str(root))
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"label": label, "pid": c.pid, "host": socket.gethostname(),
                                          "since": c.claimed_at}).encode(), 0)
                _journal(root, "claim", c)
                break
        now = time.monotonic()
        if last_log is None or now - last_log >= log_every_s:
            last_log = now
            holders = ", ".join(_holder(_slot_path(root, namespace, d, k)) for d in devices for k in range(share))
            log.info("%s: waiting for a GPU slot (%.0fs so far): all %d x %d slots in %s are taken by %s",
                     label, now - t0, len(devices), share, root, holders)
        time.sleep(poll_s)
    if not fake:
        env["CUDA_VISIBLE_DEVICES"] = c.device
    _HELD = (c, fd)
    atexit.register(release)
    log.info("%s: %s %d of %d (%s), slot %d of %d, after %.1fs", label, "fake GPU" if fake else "GPU", gpu,
             len(devices), "CUDA_VISIBLE_DEVICES left alone" if fake else f"CUDA_VISIBLE_DEVICES={c.device}", slot,
             share, c.wait_seconds)
    return c


def release() -> None:
    """Give the slot back (at normal exit; a process that dies frees it anyway when its descriptor closes)."""
    global _HELD
    if _HELD is None:
        return
    c, fd = _HELD
    _HELD = None
    _journal(Path(c.lock_dir), "release", c)
    os.close(fd)


# ------------------------------------------------------------------------------------------ CPU share
def cpu_threads(requested: int = 0, held: Claim | None = None, cores: int | None = None) -> int:
    """torch's CPU threads for a job: `requested` when given (> 0); else all cores, or, for a job that holds
    a real GPU slot, its share of them: cores // (GPUs x share).

    Why: `threads: 0` (all cores) in each of S jobs on one GPU puts S x cores OpenMP threads on the machine;
    their spinning barriers starve each job's one launching thread (measured on the H200: 3 packed study
    runs at ~100 ms a step, the GPU ~25% busy). A GPU job needs few host threads, and they change no
    number it computes. Fake GPUs (CPU tests) keep all cores: their jobs compute on the CPU, where the
    thread count is part of the run's arithmetic."""
    from moe_study.cli import n_workers

    if requested > 0:
        return requested
    cores = cores or n_workers(0)
    held = current() if held is None else held
    if held is None or held.fake:
        return cores
    return max(1, cores // max(1, held.gpus * held.share))


# ---------------------------------------------------------------------------------------- the stages
def claim_for_stage(stage: str, p: Any, run: str) -> Claim | None:
    """The claim of a shareable one-GPU stage (registry `gpu_shareable`): train with train.gpus 1 (a
    several-GPU run is launched by torchrun on whole GPUs) and evaluate. train.device cpu claims only
    fake GPUs (it uses no GPU)."""
    if stage == "train" and (p.train.gpus != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return None
    if stage == "train" and p.train.device == "cpu" and ENV_FAKE not in os.environ:
        return None
    return claim(f"{stage}@{run}")


def claiming(stage: str, body: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """`body(params, run)` of a stage entry point, run after this process has claimed its GPU slot."""

    def run_claimed(p: Any, run: str) -> Any:
        claim_for_stage(stage, p, run)
        return body(p, run)

    return run_claimed


# ------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Show the GPU slots held on this machine, or hold one.")
    ap.add_argument("--hold", type=float, default=None, metavar="SECONDS",
                    help="claim a slot (as a stage would), print its record as JSON, hold it SECONDS")
    a = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s gpu_slots %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if a.hold is not None:
        c = claim("hold")
        print(json.dumps(c.record() if c else None), flush=True)
        time.sleep(a.hold)
        return 0
    root = lock_dir()
    print(f"{root} (share {share_from_env()}):")
    for path in sorted(root.glob("*.lock")) if root.is_dir() else []:
        if path.name == "choose.lock":
            continue
        fd = _try_lock(path)
        state = "free" if fd is not None else f"held by {_holder(path)}"
        if fd is not None:
            os.close(fd)
        print(f"  {path.name[:-5]}: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
