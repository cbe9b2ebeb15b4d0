"""Paths and files: the repo root, the work folder, atomic writes and JSON reads.

Why here: a stage must never leave a half-written output (write to a temp path beside it, then
rename), and a killed writer's leftovers must be cleaned up by the next writer; doing that once
keeps every stage and library module honest in the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("work")  # relative to the repo root: the one ignored folder for build artefacts


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
