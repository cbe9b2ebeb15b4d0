"""Documents from an installed Python distribution: the text files its RECORD lists (corpus kind `python_package`).

Why installed packages: a machine with no network (the lent GPU machines) already holds hundreds of MB
of real text, the source, stubs and documentation of its Python packages, and a pinned
`package==version` names it exactly: `pip install NAME==VERSION` installs the same wheel, hence the
same files, anywhere. So the source is `{kind: python_package, package, version, include, exclude}`
and its provenance is the package, version and a hash over the (path, sha256) list of the files read.

Rules (each counted per source, never silent):
- the distribution is found with importlib.metadata in the running Python (first on sys.path, as
  `import` would); a missing one, or an installed version other than the pinned one, is an error
  naming the package and what to install (nothing is written);
- files are RECORD's entries, in sorted path order, that match one `include` glob and no `exclude`
  glob (fnmatch, case-sensitive, `*` crosses `/`), skipping entries outside site-packages
  (`../../bin/...` scripts: `outside`); one document per file, id = its path inside site-packages;
- every file read is verified against RECORD's hash (and size): a mismatch or a missing file is an
  error naming the file (an edited or corrupt installation is not the pinned package); an entry
  without a hash cannot be verified and is skipped (`unhashed`);
- binary content (`binary_file`, the plain-text reader's test) is skipped; invalid UTF-8 is replaced
  and counted (`replaced_invalid_utf8`); the corpus builder then applies its own filters (empty,
  short, long_line, max_docs).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib.metadata as md
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from moe_study.hashing import sha256_json

# Where to look for distributions: None = sys.path (tests point it at a copied site-packages).
SEARCH_PATH: list[str] | None = None


class PackageError(ValueError):
    """A python_package source that cannot be read as pinned (the message says what to fix)."""


@dataclass(frozen=True)
class PackageFile:
    path: str  # posix path inside site-packages, as RECORD writes it
    algo: str | None  # RECORD's hash algorithm ("sha256"), None when RECORD has no hash
    digest: str | None  # RECORD's hash, urlsafe base64 without padding
    size: int | None


def _matches(path: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def find_distribution(package: str, version: str, where: str) -> md.Distribution:
    """The installed distribution `package`, which must be at `version` (else PackageError naming both)."""
    found = next(iter(md.distributions(name=package, path=SEARCH_PATH if SEARCH_PATH is not None else sys.path)),
                 None)
    if found is None:
        raise PackageError(
            f"{where}: python package {package!r} is not installed in this Python ({sys.executable}); "
            f"install the pinned version with `pip install {package}=={version}`")
    if found.version != version:
        raise PackageError(
            f"{where}: python package {package!r} is installed at version {found.version}, but the source pins "
            f"{version}: install `pip install {package}=={version}` or change the pinned version")
    if found.files is None:
        raise PackageError(f"{where}: python package {package!r} {version} has no RECORD (not installed by pip?); "
                           "its files cannot be listed or verified")
    return found


def select_files(dist: md.Distribution, include: list[str], exclude: list[str], counts: Counter) -> list[PackageFile]:
    """RECORD's entries that the globs select, sorted by path; the rest counted in `counts` by reason."""
    out = []
    for f in dist.files or []:
        path = f.as_posix()
        if ".." in Path(path).parts:
            counts["outside"] += 1
            continue
        if not _matches(path, include):
            continue
        if _matches(path, exclude):
            counts["excluded"] += 1
            continue
        h = f.hash
        out.append(PackageFile(path, h.mode if h else None, h.value if h else None, f.size))
    return sorted(out, key=lambda p: p.path)


def files_digest(files: list[PackageFile]) -> str:
    """The selection's identity: a hash over the sorted (path, RECORD hash) list (no file read)."""
    return sha256_json([[f.path, f"{f.algo}={f.digest}"] for f in files if f.digest])


def read_verified(dist: md.Distribution, f: PackageFile, package: str) -> bytes:
    """The file's bytes, checked against RECORD (PackageError naming the file on any mismatch)."""
    path = Path(dist.locate_file(f.path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{path}: listed in {package}'s RECORD but missing (a damaged installation: "
                           f"reinstall with `pip install --force-reinstall {package}=={dist.version}`)") from None
    try:
        h = hashlib.new(f.algo or "")
    except ValueError:
        raise PackageError(f"{path}: RECORD hash algorithm {f.algo!r} is unknown") from None
    h.update(raw)
    got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if got != f.digest or (f.size is not None and f.size != len(raw)):
        raise PackageError(
            f"{path}: its {f.algo} does not match {package} {dist.version}'s RECORD (the file was changed after "
            f"install; reinstall with `pip install --force-reinstall {package}=={dist.version}`)")
    return raw


def open_package(package: str, version: str, include: list[str], exclude: list[str], where: str,
                 skipped: Counter) -> tuple[md.Distribution, list[PackageFile], dict]:
    """The pinned distribution, its selected files that RECORD hashes (the unhashed counted), and the
    source's provenance: package, version, how to rebuild it, the globs, counts and the files' hash."""
    dist = find_distribution(package, version, where)
    files = select_files(dist, include, exclude, skipped)
    hashed = [f for f in files if f.digest]
    if len(hashed) < len(files):
        skipped["unhashed"] += len(files) - len(hashed)
    origin = {
        "package": package, "version": version, "rebuild": f"pip install {package}=={version}",
        "include": list(include), "exclude": list(exclude),
        "record_entries": len(dist.files or []), "files": len(hashed),
        "record_bytes": sum(f.size or 0 for f in hashed), "files_sha256": files_digest(hashed),
    }
    return dist, hashed, origin
