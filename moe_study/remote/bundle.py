"""Records in transit: one tar.gz of finished runs' records (+ index.json), and its import at home.

Why a bundle: a lent machine returns at most 8 files of 16 MiB from $OUT and forgets everything else
30 s after the call, so each loan packs what it finished into one tarball (runs/<run>/..., logs/...,
index.json) and one index beside it. Import validates every run of the tarball against the study file
(moe_study.remote.records.check_identity, verify_files) before it writes anything, then moves each run
into results/<study>/records/<run>/ from a temp directory beside it (a rename: never half-written).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_study.config.schema import Params
from moe_study.io import atomic_path
from moe_study.remote.records import RECORD, RecordError, check_identity, make_record, records_dir, verify_files

log = logging.getLogger(__name__)

MAX_PART = 15 * 2**20  # $OUT returns files of at most 16 MiB


def environment() -> dict[str, Any]:
    """Where the records were made: host, torch, device (what the index and each RECORD.json carry)."""
    import platform

    env: dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        env["torch"] = None
    src = Path(".source-commit")
    env["source_commit"] = src.read_text().strip() if src.is_file() else None
    return env


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def pack(p: Params, runs: list[str], out: Path, work: Path = Path("work"), extra: dict[str, Any] | None = None,
         logs: list[Path] = ()) -> dict[str, Any]:
    """Pack the records of `runs` (those that finished; the others are listed as missing) into
    out/records.tar.gz and out/index.json; returns the index."""
    env = environment()
    index: dict[str, Any] = {"study": p.study, "environment": env, "drive": extra or {}, "runs": {}, "missing": []}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:
                rec = make_record(p, run, Path(tmp) / "runs" / run, work, {"environment": env})
            except RecordError as err:
                index["missing"].append({"run": run, "why": str(err)})
                continue
            index["runs"][run] = {k: rec[k] for k in ("params_sha256", "code_sha256", "train_wall_seconds",
                                                      "engine", "device")}
        tar_path = out / "records.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar:
            if (Path(tmp) / "runs").exists():
                tar.add(Path(tmp) / "runs", "runs")
            for log in logs:
                if log.is_file():
                    tar.add(log, f"logs/{log.name}")
            _add_bytes(tar, "index.json", json.dumps(index, indent=2, sort_keys=True, default=str).encode())
    size = tar_path.stat().st_size
    index["tarball_bytes"] = size
    if size > MAX_PART:
        index["warning"] = f"records.tar.gz is {size / 2**20:.1f} MiB, over what $OUT returns: pack fewer --runs"
    (out / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True, default=str) + "\n")
    return index


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = []
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise RecordError(f"{m.name}: refusing a tarball entry that is absolute, climbs out or is a link")
        members.append(m)
    return members


def bundle_records(tarball: Path) -> dict[str, dict[str, Any]]:
    """Each run's RECORD.json in `tarball` (read only; nothing is checked or written)."""
    out = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for m in _safe_members(tar):
            parts = Path(m.name).parts
            if len(parts) == 3 and parts[0] == "runs" and parts[2] == RECORD:
                out[parts[1]] = json.loads(tar.extractfile(m).read())
    return out


def import_bundle(p: Params, tarball: Path, results: Path | None = None, replace: bool = False,
                  only: set[str] | None = None, keep: bool = False) -> list[str]:
    """Validate every run of `tarball` (or those in `only`) against study `p`, then move each into
    records/<run>/.

    A run whose identical record is already there is skipped; a different one is refused unless
    `replace` (the tarball's wins) or `keep` (the one already here wins: a run that a later call of a
    loan ran again, whose record differs in its logs and timings). Returns the runs written."""
    if replace and keep:
        raise RecordError("pass --replace or --keep, not both")
    dest_root = records_dir(p, results)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(tmp, members=_safe_members(tar), filter="data")
        runs_dir = Path(tmp) / "runs"
        runs = sorted(d.name for d in runs_dir.iterdir()) if runs_dir.is_dir() else []
        runs = [r for r in runs if only is None or r in only]
        if not runs and only is not None:
            return []
        if not runs:
            raise RecordError(f"{tarball}: no run records in it")
        todo = []
        for run in runs:  # everything is checked before anything is written
            rec_file = runs_dir / run / RECORD
            if not rec_file.is_file():
                raise RecordError(f"run {run}: no {RECORD} in {tarball}")
            record = json.loads(rec_file.read_text())
            check_identity(p, run, record)
            verify_files(runs_dir / run, record)
            have = dest_root / run / RECORD
            if have.is_file():
                if have.read_bytes() == rec_file.read_bytes():  # it lists every file's sha256
                    continue
                if keep:
                    log.info("run %s: kept the record already in %s (the tarball's differs)", run, dest_root / run)
                    continue
                if not replace:
                    raise RecordError(f"run {run}: {dest_root / run} already holds another record of it "
                                      "(pass --replace to overwrite it, or --keep to keep it)")
            todo.append(run)
        for run in todo:
            with atomic_path(dest_root / run) as target:
                shutil.copytree(runs_dir / run, target)
    return todo
