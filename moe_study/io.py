"""Paths and files: the repo root, the work folder, atomic writes and JSON reads.

Why here: a stage must never leave a half-written output (write to a temp path beside it, then
rename), and a killed writer's leftovers must be cleaned up by the next writer; doing that once
keeps every stage and library module honest in the same way.
"""

from __future__ import annotations

import contextlib
import errno
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


class ClearError(Exception):
    """An error whose message is complete for the user (it names the file and what to do).

    Why a type: every stage entry point prints these as one `error: ...` line with exit code 2
    (moe_study/cli.py installs the hook), so a library function deep in a stage can stop it cleanly
    without each stage listing every such error.
    """


class DiskFullError(ClearError):
    """A write ran out of space; the previous output is still in place (see atomic_path)."""


class OutputError(ClearError):
    """A command's output path would destroy something the command did not create."""


# --------------------------------------------------------------------------------- atomic writes
def pid_alive(pid: int) -> bool:
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
            if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            if kind == ".old" and not dest.exists():
                leftover.rename(dest)
            elif leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            cleaned += 1
    return cleaned


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, also from writers (pyarrow) that raise a plain OSError without an errno."""
    if isinstance(err, DiskFullError):
        return True
    if not isinstance(err, OSError):
        return False
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _disk_full(dest: Path, tmp: Path) -> DiskFullError:
    """The one message of a full disk: the path, the space it needed at least, what is free."""
    written = _tree_bytes(tmp)
    free = shutil.disk_usage(dest.parent).free
    kept = "the previous output is unchanged" if dest.exists() else "nothing was written"
    return DiskFullError(
        f"{dest}: no space left on device while writing it (needs more than the {written / 1e6:.1f} MB "
        f"written before the disk filled; {free / 1e6:.1f} MB free on {dest.parent}); {kept}. "
        "Free some space (or point work/ elsewhere) and re-run."
    )


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success rename it over `dest` (file or directory).

    A crash (or kill -9) leaves only a `.tmp-<name>-<host>-<pid>-*` sibling, never a half-written `dest`;
    the next writer of `dest` removes it (`recover_interrupted`). A full disk (ENOSPC) becomes one
    DiskFullError naming `dest` (not the temp path) and the space needed, with `dest` untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-{_writer()}-", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        _replace(target, dest)
    except (OSError, DiskFullError) as err:
        if _is_disk_full(err):
            raise _disk_full(dest, tmp) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(target: Path, dest: Path) -> None:
    """Rename the finished `target` over `dest`; a directory goes through `.old-*` (see recover_interrupted)."""
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f".old-{dest.name}-{_writer()}")
        dest.rename(old)
        target.rename(dest)
        shutil.rmtree(old)
    else:
        os.replace(target, dest)


def check_output(dest: Path | str, inputs: list[Path | str] = (), force: bool = False,
                 marker: str | None = None) -> None:
    """Refuse an output path that would replace something this command did not create.

    Why: an output is renamed over wholesale at the end (atomic_path), so `--out ~/data` or
    `--output input.parquet` would delete the user's files. Refused, unless `force`: an output that is
    (or contains) one of `inputs`, and an existing directory that is not a previous
    output of this command (one holding `marker`, e.g. the manifest.json the stage writes; with no
    marker, the output is a file and any existing directory is refused).
    """
    if force:
        return
    dest = Path(dest)
    here = dest.resolve()
    for i in inputs:
        src = Path(i).resolve()
        if here == src or here in src.parents:
            raise OutputError(f"{dest}: the output would overwrite the input {i} (choose another output, "
                              "or pass --force)")
    if dest.is_dir() and not (marker and (dest / marker).is_file()):
        what = f"has no {marker}, so it is not this command's output" if marker else "the output is a file"
        raise OutputError(f"{dest}: is an existing directory ({what}); refusing to replace it "
                          "(choose a new path, or pass --force)")


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
