"""Corpus source kind `python_package`: an installed distribution's RECORD files, pinned and verified.

The venv's own pyyaml is copied (the files its RECORD lists) into a temporary site-packages that
moe_study.data.pypackage.SEARCH_PATH points at, so tampering never touches the venv.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moe_study.config.schema import CorpusConfig, ParamsError, parse_params
from moe_study.data import pypackage
from moe_study.data.corpus import CorpusError, build_corpus

PKG = "pyyaml"
VERSION = md.version(PKG)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site-packages holding a copy of pyyaml (every file its RECORD lists inside site-packages)."""
    dist = md.distribution(PKG)
    root = tmp_path / "site"
    for f in dist.files:
        if ".." in Path(f.as_posix()).parts:
            continue
        src = Path(dist.locate_file(f))
        if src.is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / f)
    monkeypatch.setattr(pypackage, "SEARCH_PATH", [str(root)])
    return root


def record_path(root: Path) -> Path:
    [rec] = root.glob("*.dist-info/RECORD")
    return rec


def add_to_record(root: Path, rel: str, data: bytes | None, hashed: bool = True) -> None:
    """Write `rel` (if data is given) and list it in RECORD, with its sha256 unless hashed is False."""
    if data is not None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data or b"").digest()).rstrip(b"=").decode()
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([rel, digest if hashed else "", len(data or b"") if hashed else ""])
    with open(record_path(root), "a") as f:
        f.write(buf.getvalue())


def source(**kw: object) -> dict:
    return {"kind": "python_package", "package": PKG, "version": VERSION, **kw}


def build(tmp_path: Path, *sources: dict, name: str = "corpus") -> dict:
    cfg = CorpusConfig.model_validate({"sources": list(sources)})
    return build_corpus(cfg, tmp_path / name, tmp_path / f"{name}.json", root=tmp_path, cache=tmp_path / "cache")


def ids(directory: Path) -> list[str]:
    return [i for p in sorted(directory.glob("docs-*.parquet")) for i in pq.read_table(p)["id"].to_pylist()]


def test_reads_record_files_in_order_with_provenance(tmp_path: Path, site: Path) -> None:
    m = build(tmp_path, source())
    got = ids(tmp_path / "corpus")
    dist_files = sorted(f.as_posix() for f in md.distribution(PKG).files
                        if f.as_posix().endswith((".py", ".pyi", ".md", ".rst", ".txt")) and ".dist-info/" not in
                        f.as_posix() and ".." not in f.parts)
    [s] = m["sources"]
    assert got == [f"{PKG}:{p}" for p in dist_files if f"{PKG}:{p}" in got]  # RECORD order = sorted paths
    assert got and all(i.startswith(f"{PKG}:yaml/") or i.startswith(f"{PKG}:_yaml/") for i in got)
    assert s["kind"] == "python_package" and s["label"] == PKG
    o = s["origin"]
    assert (o["package"], o["version"], o["rebuild"]) == (PKG, VERSION, f"pip install {PKG}=={VERSION}")
    assert o["files"] == len(dist_files) and o["files"] == s["docs"] + sum(s["skipped"].values()) - s["skipped"].get(
        "excluded", 0) - s["skipped"].get("outside", 0)
    assert o["record_bytes"] >= s["bytes"] > 0
    assert m["provenance"]["inputs"] == {PKG: o["files_sha256"]}
    metrics = json.loads((tmp_path / "corpus.json").read_text())
    assert metrics["sources"][PKG]["origin"]["files_sha256"] == o["files_sha256"]


def test_deterministic(tmp_path: Path, site: Path) -> None:
    a, b = build(tmp_path, source(), name="a"), build(tmp_path, source(), name="b")
    assert a["sha256"] == b["sha256"] and ids(tmp_path / "a") == ids(tmp_path / "b")
    # the files hash is a function of RECORD alone: the installed venv copy gives the same one
    assert a["sources"][0]["origin"]["files_sha256"] == b["sources"][0]["origin"]["files_sha256"]


def test_include_exclude_and_max_docs(tmp_path: Path, site: Path) -> None:
    m = build(tmp_path, source(include=["yaml/*.py"], exclude=["*/constructor.py", "*/__init__.py"], max_docs=3))
    got = ids(tmp_path / "corpus")
    assert len(got) == 3 and all(i.startswith(f"{PKG}:yaml/") and i.endswith(".py") for i in got)
    assert not any(i.endswith(("constructor.py", "__init__.py")) for i in got)
    [s] = m["sources"]
    assert s["skipped"]["excluded"] == 2 and s["truncated"] is True


def test_version_mismatch_and_missing_package_fail_before_writing(tmp_path: Path, site: Path) -> None:
    with pytest.raises(CorpusError, match=rf"corpus\.sources\[0\]: python package '{PKG}' is installed at version "
                       rf"{VERSION}, but the source pins 0\.0\.1: install `pip install {PKG}==0\.0\.1`"):
        build(tmp_path, source(version="0.0.1"))
    with pytest.raises(CorpusError, match=r"corpus\.sources\[1\]: python package 'no-such-dist' is not installed"):
        build(tmp_path, source(), {"kind": "python_package", "package": "no-such-dist", "version": "1.0"})
    assert not (tmp_path / "corpus").exists()


def test_tampered_or_missing_file_is_an_error_naming_it(tmp_path: Path, site: Path) -> None:
    target = site / "yaml" / "reader.py"
    target.write_text(target.read_text() + "\n# edited\n")
    with pytest.raises(CorpusError, match=r"yaml/reader\.py: its sha256 does not match pyyaml .*RECORD"):
        build(tmp_path, source())
    target.unlink()
    with pytest.raises(CorpusError, match=r"yaml/reader\.py: listed in pyyaml's RECORD but missing"):
        build(tmp_path, source())
    assert not (tmp_path / "corpus").exists()


def test_binary_and_unhashed_files_are_skipped_and_counted(tmp_path: Path, site: Path) -> None:
    add_to_record(site, "yaml/blob.txt", b"\x00\x01binary\x00" * 10)
    add_to_record(site, "yaml/notes.md", b"# Notes\n\nNot listed with a hash in RECORD.\n", hashed=False)
    m = build(tmp_path, source())
    [s] = m["sources"]
    assert s["skipped"]["binary_file"] == 1 and s["skipped"]["unhashed"] == 1
    assert f"{PKG}:yaml/blob.txt" not in ids(tmp_path / "corpus")


def test_schema() -> None:
    base = {"study": "s", "budget": {"params": 1e5, "compute": 1e12, "unique_tokens": 1000},
            "runs": {"d": {"kind": "dense"}}}
    p = parse_params({**base, "corpus": {"sources": [source()]}})
    assert p.corpus.sources[0].include == ["*.py", "*.pyi", "*.md", "*.rst", "*.txt"]
    with pytest.raises(ParamsError, match=r"corpus\.sources\.0\.python_package\.version"):
        parse_params({**base, "corpus": {"sources": [{"kind": "python_package", "package": PKG}]}})


def test_gpu_listing_script_uses_the_schema_defaults() -> None:
    """bench/gpu_corpus_listing.py (stdlib only, run on the GPU machine) copies the source's default globs."""
    import importlib.util

    from moe_study.config.schema import PythonPackageSource
    from moe_study.io import ROOT

    spec = importlib.util.spec_from_file_location("listing", ROOT / "bench" / "gpu_corpus_listing.py")
    listing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(listing)
    d = PythonPackageSource(kind="python_package", package=PKG, version=VERSION)
    assert (d.include, d.exclude) == (listing.INCLUDE, listing.EXCLUDE)
    row = listing.listing(PKG)
    assert row["installed"] and row["version"] == VERSION and row["files"] > 0 and row["unhashed"] == 0
