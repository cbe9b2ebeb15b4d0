"""What every stage's command line shares: logging, progress with rate and ETA, one-line errors.

Bad input the user can fix ends as one `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from moe_study.io import ClearError, pid_alive

T = TypeVar("T")

log = logging.getLogger("stages")

# Beside work/, not in it: taking the lock must not create work/ (a stage refused for bad params
# writes nothing at all). Relative to the repo root, like work/.
ENGINE_LOCK = Path("work.lock")
ENGINES = ("dvc", "snakemake")


class EngineLockError(ClearError):
    """work/ is being built by another engine (DVC vs Snakemake vs a stage run by hand)."""


def setup_logging(stage: str) -> logging.Logger:
    """Every stage entry point calls this first: logging, one-line errors, and the engine lock.

    Why here: it is the one function all twelve stages (and the library parts that run as a stage)
    already share, so the lock and the error hook cannot be forgotten by one of them.
    """
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO"),
        format=f"%(asctime)s {stage} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    sys.excepthook = _clear_error_hook
    claim_workdir(stage)
    return logging.getLogger(f"stages.{stage}")


def _clear_error_hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
    """An uncaught ClearError (disk full, engine lock, refused output) is one line and exit code 2.

    Its `finally` blocks have run by now (temp outputs removed); os._exit because an excepthook
    cannot change the exit status any other way.
    """
    if not isinstance(err, ClearError):
        sys.__excepthook__(kind, err, tb)
        return
    print(f"error: {err}", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


# ---------------------------------------------------------------------------------- engine lock
def _process_argv(pid: int) -> tuple[int, list[str]] | None:
    """(parent pid, argv) of a process from /proc; None where there is no /proc (macOS) or it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    return ppid, [a.decode(errors="replace") for a in argv if a]


def _engine_of(argv: list[str]) -> str | None:
    """`dvc ...`, `snakemake ...`, `python -m dvc|snakemake ...` (only the first words: not arguments)."""
    head = argv[:3]
    for engine in ENGINES:
        if any(Path(a).name == engine for a in head) or ["-m", engine] in (head[1:3], head[0:2]):
            return engine
    return None


def current_engine() -> tuple[str, int]:
    """(engine, its pid): the nearest dvc / snakemake ancestor, else ("direct", this process)."""
    pid = os.getpid()
    for _ in range(64):
        info = _process_argv(pid)
        if info is None:
            break
        ppid, argv = info
        engine = _engine_of(argv)
        if engine is not None:
            return engine, pid
        if ppid <= 1:
            break
        pid = ppid
    return "direct", os.getpid()


def _read_lock() -> dict[str, Any] | None:
    for _ in range(20):  # a holder that just created the file may not have written it yet
        try:
            holder = json.loads(ENGINE_LOCK.read_text())
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}  # unreadable: stale


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return bool(holder)  # another machine's process cannot be checked: assume it runs
    pid = holder.get("pid")
    return isinstance(pid, int) and pid_alive(pid)


def claim_workdir(stage: str) -> None:
    """Take work.lock for this engine, or refuse naming the live run of another engine that holds it.

    Why: `dvc repro` and `snakemake` started in one checkout would both write work/ (each engine's
    own lock knows nothing of the other). Stages of one engine share the lock (they run in parallel
    by design); a holder whose process has ended is replaced. Never deleted by its holder: the next
    claimant checks whether the recorded process still lives.
    """
    engine, pid = current_engine()
    me = {"engine": engine, "pid": pid, "host": socket.gethostname(), "stage": stage, "since": time.time()}
    for _ in range(10):
        try:
            fd = os.open(ENGINE_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock()
            if holder is None:
                continue
            if holder.get("engine") == engine and _holder_alive(holder):
                return
            if _holder_alive(holder):
                raise EngineLockError(
                    f"{ENGINE_LOCK}: work/ is being built by a {holder.get('engine')} run (pid {holder.get('pid')} "
                    f"on {holder.get('host')}, stage {holder.get('stage')}); this {engine} run of stage {stage} "
                    f"would race it. Wait for it to end (or stop it); if it is gone, delete {ENGINE_LOCK}.") from None
            ENGINE_LOCK.unlink(missing_ok=True)  # stale: its process has ended
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


def n_workers(requested: int = 0) -> int:
    """0 means all cores this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


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


def run_from_dvc_stage() -> str | None:
    """The run of a DVC foreach stage, from the address DVC exports (`[dvc.yaml:]plan@<run>`).

    Why not `--run ${key}` in dvc.yaml: DVC would put the params.yaml key on a shell command line
    before anything validates it; from the environment it is only ever a Python string.
    """
    address = os.environ.get("DVC_STAGE", "")
    name = address.rsplit(":", 1)[-1]
    return name.split("@", 1)[1] if "@" in name else None


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

    from moe_study.config.load import load_params
    from moe_study.config.schema import ParamsError

    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=(doc or "").splitlines()[0])
    ap.add_argument("--run", default=None, help="a run name from params.yaml runs (under DVC: from DVC_STAGE)")
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    a.run = a.run or run_from_dvc_stage()
    if a.run is None:
        ap.error("--run NAME is required (outside DVC)")
    setup_logging(stage)
    try:
        p = load_params(a.params)
        p.run(a.run)
        body(p, a.run)
    except (ParamsError, KeyError, FileNotFoundError, ValueError, *errors) as err:
        fail(str(err).strip("'\""))
    return 0
