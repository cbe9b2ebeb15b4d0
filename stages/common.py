"""Small utilities every stage shares: paths, atomic writes, hashing, provenance, progress.

Why here: each stage must (1) never leave a half-written output (write to a temp path, then
rename), (2) record the hashes of what made its outputs, and (3) show progress on long work.
Doing that once keeps the stages short and the guarantees uniform.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("work")  # relative to the repo root: the one ignored folder for build artefacts
T = TypeVar("T")

log = logging.getLogger("stages")


def setup_logging(stage: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO"),
        format=f"%(asctime)s {stage} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return logging.getLogger(f"stages.{stage}")


def n_workers(requested: int = 0) -> int:
    """0 means all cores this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------- hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path | str) -> str:
    """Hash of a file, or of a directory as the sorted (relative path, file hash) list.

    Hidden files are engine bookkeeping (Snakemake's `.snakemake_timestamp` in directory outputs),
    not content, so they are left out: both engines give a directory the same hash.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    files = (q for q in path.rglob("*") if q.is_file())
    for p in sorted(q for q in files if not any(part.startswith(".") for part in q.relative_to(path).parts)):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array: a bijection with full avalanche; returns a new array.

    The one integer mixer of the project (shingle and band hashing, split assignment, permutations,
    samples): fixed constants, so results never change with a numpy upgrade.
    """
    z = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function: the golden-gamma increment, then the finaliser."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode())


def code_hash(*modules: str) -> str:
    """Hash of the source files of the given modules (e.g. 'stages.tokenize', 'stages.common')."""
    h = hashlib.sha256()
    for m in sorted(set(modules)):
        p = ROOT / (m.replace(".", "/") + ".py")
        if not p.exists():
            p = ROOT / m.replace(".", "/") / "__init__.py"
        h.update(m.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------- atomic writes
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _writer() -> str:
    """Who writes: host and pid, so a shared (cluster) file system never mixes up two writers."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temp_sibling(path: Path) -> Path:
    """A temp name beside `path`, unique to this writer; `recover_interrupted` knows its shape."""
    return path.with_name(f".tmp-{path.name}-{_writer()}-{uuid.uuid4().hex[:8]}")


def recover_interrupted(dest: Path | str) -> int:
    """Clean up after writers of `dest` on this host that were killed (kill -9, OOM); returns how many.

    A dead writer leaves `.tmp-<name>-<host>-<pid>-*` (its unfinished output: deleted) and, if it
    died between the two renames that replace a directory, `.old-<name>-<host>-<pid>` with `dest`
    missing (the previous output: renamed back, so nothing that was complete is lost). Leftovers of
    live processes and of other hosts are not touched.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return 0
    host = socket.gethostname()
    cleaned = 0
    for kind in (".old", ".tmp"):
        prefix = f"{kind}-{dest.name}-{host}-"
        for leftover in sorted(dest.parent.glob(prefix + "*")):
            pid = leftover.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if kind == ".old" and not dest.exists():
                leftover.rename(dest)
            elif leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            cleaned += 1
    return cleaned


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success rename it over `dest` (file or directory).

    A crash (or kill -9) leaves only a `.tmp-<name>-<host>-<pid>-*` sibling, never a half-written `dest`;
    the next writer of `dest` removes it (`recover_interrupted`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-{_writer()}-", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".old-{dest.name}-{_writer()}")
            dest.rename(old)
            target.rename(dest)
            shutil.rmtree(old)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(dest: Path | str, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json(dest: Path | str, obj: Any) -> None:
    write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (run the stage that makes it first)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt JSON ({err})") from None


# ------------------------------------------------------------------------------------ provenance
def provenance(stage: str, inputs: dict[str, str], params: Any, modules: Iterable[str] = ()) -> dict:
    """What made an output: input hashes, the params it read and the code that ran.

    `inputs` maps a name to an already-known hash (e.g. a manifest's own hash), so large inputs
    are never re-hashed byte by byte downstream.
    """
    mods = [f"stages.{stage}", "stages.common", *modules]
    return {
        "stage": stage,
        "inputs": dict(sorted(inputs.items())),
        "params": params,
        "params_sha256": sha256_json(params),
        "code_sha256": code_hash(*mods),
    }


# -------------------------------------------------------------------------------------- progress
def progress(it: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """A tqdm bar on a terminal, periodic log lines with rate and ETA otherwise (DVC/Snakemake logs)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            it,
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=True,
            mininterval=0.5 if interactive else 10.0,
            disable=os.environ.get("NO_PROGRESS") == "1",
            file=sys.stderr,
            dynamic_ncols=interactive,
            ascii=not interactive,
        )
    )


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def fail(msg: str, code: int = 2) -> None:
    """Exit with one clear line (used for bad inputs the user can fix)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def per_run_main(
    stage: str,
    doc: str | None,
    body: Callable[[Any, str], Any],
    errors: tuple[type[BaseException], ...] = (),
    argv: list[str] | None = None,
) -> int:
    """The command line of a per-run stage (`python -m stages.<stage> --run NAME`).

    Validates params.yaml and the run name before any compute, then calls `body(params, run)`;
    an expected error (bad params, a missing input, the stage's own error types) becomes one clear
    line and exit code 2 instead of a traceback.
    """
    import argparse

    from stages.schema import ParamsError, load_params

    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=(doc or "").splitlines()[0])
    ap.add_argument("--run", required=True, help="a run name from params.yaml runs")
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    setup_logging(stage)
    try:
        p = load_params(a.params)
        p.run(a.run)
        body(p, a.run)
    except (ParamsError, KeyError, FileNotFoundError, ValueError, *errors) as err:
        fail(str(err).strip("'\""))
    return 0


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun / the deepspeed launcher (1 process: 0, 1, 0);
    valid before torch.distributed is initialised (checkpoint pruning runs then)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))
