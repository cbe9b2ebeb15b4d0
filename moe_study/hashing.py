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
