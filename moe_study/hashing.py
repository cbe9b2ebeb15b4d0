"""Content hashes (SHA-256 of bytes, files, trees, canonical JSON) and the one integer mixer.

Why one place: outputs are content-addressed and every seeded choice (shingles, split, permutations,
samples) goes through `mix64`, whose fixed constants keep results identical across numpy upgrades.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_study.io import ClearError


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


# ------------------------------------------------------------------------------ manifest checks
MANIFEST = "manifest.json"


class IntegrityError(ClearError, ValueError):
    """A file that differs from the sha256 its manifest records (the message names both)."""


def recorded_hashes(manifest: Any) -> dict[str, str]:
    """{file name: sha256} of every `{"file": ..., "sha256": ...}` entry anywhere in a manifest.

    Why one walker: the stages' manifests nest their file entries differently (shards, split,
    tasks, model), and a reader should not need to know which shape it is holding.
    """
    found: dict[str, str] = {}
    if isinstance(manifest, dict):
        if isinstance(manifest.get("file"), str) and isinstance(manifest.get("sha256"), str):
            found[manifest["file"]] = manifest["sha256"]
        for v in manifest.values():
            found.update(recorded_hashes(v))
    elif isinstance(manifest, list):
        for v in manifest:
            found.update(recorded_hashes(v))
    return found


def _manifest_entries(directory: Path) -> tuple[Path, dict[str, str]]:
    m = directory / MANIFEST
    if not m.is_file():
        return m, {}
    try:
        return m, recorded_hashes(json.loads(m.read_text()))
    except ValueError:
        raise IntegrityError(f"{m}: corrupt JSON (re-run the stage that makes it)") from None


def verify_listed(path: Path | str) -> None:
    """Check `path` against the sha256 that the manifest.json beside it records, if it records one.

    Why before use: a stage run by hand (not through DVC, which would notice) must not silently
    compute on a flipped byte; the error names the file so it can be rebuilt.
    """
    path = Path(path)
    m, entries = _manifest_entries(path.parent)
    if path.name in entries and sha256_file(path) != entries[path.name]:
        raise IntegrityError(f"{path}: sha256 differs from {m} (corrupt or modified since it was written; "
                             "re-run the stage that makes it)")


def verify_dir(directory: Path | str) -> None:
    """Check every file the directory's manifest.json lists (missing or changed: IntegrityError)."""
    directory = Path(directory)
    m, entries = _manifest_entries(directory)
    for name in entries:
        if not (directory / name).is_file():
            raise IntegrityError(f"{directory / name}: listed in {m} but missing")
        verify_listed(directory / name)


def write_file_list(directory: Path | str) -> dict[str, Any]:
    """Write manifest.json listing every file of `directory` with its sha256 (for verify_dir)."""
    directory = Path(directory)
    files = [{"file": p.name, "sha256": sha256_file(p)} for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MANIFEST]
    manifest = {"files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
