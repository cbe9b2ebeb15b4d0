"""The corpus stage and the Debian recipes, offline: fixtures are written here, nothing is downloaded."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from moe_study.config.schema import CorpusConfig
from moe_study.data import recipes
from moe_study.data.corpus import CorpusError, build_corpus, iter_documents
from moe_study.data.recipes import DebianPackage, RecipeError
from stages import corpus as corpus_stage


# --------------------------------------------------------------------------------------- fixtures
def write_dictd(root: Path, name: str, entries: list[tuple[list[str], bytes]]) -> Path:
    """A dictd database: entries in data order, index sorted by headword (as dictfmt writes it)."""
    base = root / "usr/share/dictd"
    base.mkdir(parents=True, exist_ok=True)
    data, index = b"", []
    for headwords, body in entries:
        for h in headwords:
            index.append(f"{h}\t{recipes.dictd_b64_encode(len(data))}\t{recipes.dictd_b64_encode(len(body))}")
        data += body
    with open(base / f"{name}.dict.dz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    (base / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")
    return root


DICTD_ENTRIES = [
    (["00-database-info", "00databaseshort"], b"00-database-info\n   This file was converted by dictfmt.\n"),
    (["zebra", "Zebra"], b"zebra\n   An African {equine} with black and white stripes.\n\n\n\n"),
    (["aardvark"], b"aardvark\r\n   A burrowing {mammal} of Africa that eats termites.\r\n"),
    (["cafe"], "caf\u00e9\n   A small restaurant selling light meals \u2019n drinks.\n".encode("cp1252")),
    (["x"], b"x\n"),  # shorter than min_chars
    (["blank"], b"   \n\n"),
]


@pytest.fixture
def dict_root(tmp_path: Path) -> Path:
    return write_dictd(tmp_path / "dict-jargon", "jargon", DICTD_ENTRIES)


@pytest.fixture
def fortune_root(tmp_path: Path) -> Path:
    root = tmp_path / "fortunes"
    base = root / "usr/share/games/fortunes"
    (base / "de").mkdir(parents=True)
    (base / "computers").write_text(
        "Real programmers don't comment their code.\n%\n"
        "If it was hard to write, it should be hard to understand.\n\t\t-- Anonymous\n%\n"
        "%\n"
        "Short.\n%\n"
    )
    (base / "computers.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (base / "computers.u8").symlink_to("computers")
    (base / "de" / "alt").write_bytes("Gr\u00fc\u00dfe aus der alten Zeit, sagte er.\n%\n".encode("latin-1"))
    return root


def fake_debian(monkeypatch, roots: dict[str, Path]) -> None:
    """Serve the unpacked fixture trees as if apt had downloaded and dpkg had unpacked them."""

    def prepare(package: str, cache: Path) -> DebianPackage:
        return DebianPackage(package, "1.0-1", Path(f"{package}_1.0-1_all.deb"), "ab" * 32, roots[package])

    monkeypatch.setattr(recipes, "prepare_package", prepare)
    monkeypatch.setattr(recipes, "apt_usable", lambda: True)


def cfg(*sources: dict, min_chars: int = 16) -> CorpusConfig:
    return CorpusConfig.model_validate({"sources": list(sources), "min_chars": min_chars})


def read_all(directory: Path) -> list[tuple[str, str, str]]:
    rows = []
    for b in iter_documents(directory):
        rows += zip(*(b.column(c).to_pylist() for c in ("id", "source", "text")), strict=True)
    return rows


def build(tmp_path: Path, config: CorpusConfig, name: str = "corpus", **kw) -> dict:
    return build_corpus(config, tmp_path / name, tmp_path / f"{name}.json", root=tmp_path, **kw)


# ------------------------------------------------------------------------------------------ dictd
def test_dictd_base64_known_values() -> None:
    assert recipes.dictd_b64("A") == 0
    assert recipes.dictd_b64("BA") == 64
    assert recipes.dictd_b64("BdqM") == 383628  # dict-devil's 00databasealphabet offset
    for v in (0, 1, 63, 64, 4095, 383628, 39952321):
        assert recipes.dictd_b64(recipes.dictd_b64_encode(v)) == v


def test_dictd_entries_once_in_offset_order_without_metadata(dict_root: Path) -> None:
    notes: Counter = Counter()
    docs = list(recipes.iter_package_documents("dict-jargon", dict_root, notes))
    assert [d[0] for d in docs] == [f"dict-jargon:{i}" for i in range(5)]
    texts = [d[1] for d in docs]
    assert texts[0] == "zebra\n   An African equine with black and white stripes."  # braces gone, once
    assert texts[1] == "aardvark\n   A burrowing mammal of Africa that eats termites."  # CRLF normalised
    assert texts[2] == "caf\u00e9\n   A small restaurant selling light meals \u2019n drinks."
    assert texts[3:] == ["x", ""]
    assert not any("dictfmt" in t for t in texts)
    assert notes["metadata_entries"] == 1 and notes["decoded_cp1252"] == 1
    assert notes["index_headwords"] == 8


def test_dictd_bad_index_is_a_clear_error(tmp_path: Path) -> None:
    root = write_dictd(tmp_path / "d", "devil", [(["a"], b"abc")])
    (root / "usr/share/dictd/devil.index").write_text("no tabs here\nnor here\n")
    with pytest.raises(RecipeError, match="devil.index"):
        list(recipes.iter_package_documents("dict-devil", root, Counter()))


def test_clean_gcide_markup() -> None:
    raw = (
        'Cockle \\Coc"kle\\, v. t. [imp. & p. p. {Cockled}; p. pr. & vb. n.\n'
        "   {Cockling}.] [Of uncertian origin.]\n"
        "   To cause to contract into wrinkles or ridges. [Obs.]\n"
        "   [1913 Webster]\n\n"
        "   {Cockling sea}, waves dashing against each other. --Ham. Nav. Encyc.\n"
        "      [1913 Webster +PJC]\n"
        '   -- Cock"ling*ly, adv. Abaser ([.a]*b[=a]s"[~e]r), n. [F. fa[,c]ade]\n'
        "   (Sp. casta[~n]a) [Webster 1913 Suppl.] Facade\n"
    )
    out = recipes.tidy(recipes.clean_gcide(raw))
    assert out == (
        "Cockle, v. t. [imp. & p. p. Cockled; p. pr. & vb. n.\n"
        "   Cockling.] [Of uncertian origin.]\n"
        "   To cause to contract into wrinkles or ridges. [Obs.]\n\n"
        "   Cockling sea, waves dashing against each other. --Ham. Nav. Encyc.\n"
        "   -- Cocklingly, adv. Abaser, n. [F. fa\u00e7ade]\n"
        "   (Sp. casta\u00f1a)"
    )


# --------------------------------------------------------------------------------------- fortunes
def test_fortunes_split_skip_index_and_symlinks(fortune_root: Path) -> None:
    notes: Counter = Counter()
    docs = list(recipes.iter_package_documents("fortunes", fortune_root, notes))
    texts = [t for _, t in docs]
    assert texts == [
        "Real programmers don't comment their code.",
        "If it was hard to write, it should be hard to understand.\n\t\t-- Anonymous",
        "",
        "Short.",
        "",
        "Gr\u00fc\u00dfe aus der alten Zeit, sagte er.",  # latin-1 file, decoded and counted
        "",
    ]
    assert notes["files"] == 2 and notes["decoded_cp1252"] == 1
    assert [i for i, _ in docs][:2] == ["fortunes:0", "fortunes:1"]


def test_unsupported_package_names_the_field(tmp_path: Path) -> None:
    c = cfg({"kind": "debian", "package": "fortunes"}, {"kind": "debian", "package": "dict-klingon"})
    with pytest.raises(CorpusError, match=r"corpus\.sources\[1\]\.package.*dict-klingon.*supported"):
        build(tmp_path, c)
    assert not (tmp_path / "corpus").exists()


def test_debian_sources_end_to_end(tmp_path, dict_root, fortune_root, monkeypatch) -> None:
    fake_debian(monkeypatch, {"dict-jargon": dict_root, "fortunes": fortune_root})
    c = cfg({"kind": "debian", "package": "dict-jargon"}, {"kind": "debian", "package": "fortunes", "max_docs": 2})
    m = build(tmp_path, c)
    rows = read_all(tmp_path / "corpus")
    assert [r[0] for r in rows] == ["dict-jargon:0", "dict-jargon:1", "dict-jargon:2", "fortunes:0", "fortunes:1"]
    assert {r[1] for r in rows} == {"dict-jargon", "fortunes"}
    jargon, fortunes = m["sources"]
    assert jargon["skipped"] == {"empty": 1, "short": 1} and jargon["docs"] == 3
    assert jargon["origin"]["version"] == "1.0-1" and jargon["sha256"] == "ab" * 32
    assert fortunes["docs"] == 2 and fortunes["truncated"] is True
    assert m["provenance"]["inputs"] == {"dict-jargon": "ab" * 32, "fortunes": "ab" * 32}
    metrics = json.loads((tmp_path / "corpus.json").read_text())
    assert metrics["docs"] == 5 and metrics["sources"]["dict-jargon"]["bytes"] == jargon["bytes"]
    assert m["bytes"] == sum(len(r[2].encode()) for r in rows)


# ------------------------------------------------------------------------------- apt-get and dpkg
def test_missing_apt_lists_says_run_apt_get_update(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(recipes, "apt_lists_present", lambda: False)
    assert recipes.apt_candidate("dict-devil") is None
    with pytest.raises(RecipeError, match=r"run `apt-get update` \(as root\) first"):
        recipes.prepare_package("dict-devil", tmp_path / "cache")
    with pytest.raises(CorpusError, match=r"corpus\.sources\[0\]\.package: .*run `apt-get update`"):
        build_corpus(cfg({"kind": "debian", "package": "dict-devil"}), tmp_path / "c", None, root=tmp_path,
                     cache=tmp_path / "cache")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_cached_deb_is_unpacked_and_reused(tmp_path, monkeypatch) -> None:
    bore = b"BORE, n.  A person who talks when you wish him to listen.\n"
    tree = write_dictd(tmp_path / "tree", "devil", [(["bore"], bore)])
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        "Package: dict-devil\nVersion: 9.9-1\nArchitecture: all\nMaintainer: t <t@example>\nDescription: test\n"
    )
    deb_dir = tmp_path / "cache/debs/dict-devil"
    deb_dir.mkdir(parents=True)
    deb = deb_dir / "dict-devil_9.9-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    digest = recipes.sha256_file(deb)

    monkeypatch.setattr(recipes, "apt_lists_present", lambda: False)  # offline: the cached .deb is used
    pkg = recipes.prepare_package("dict-devil", tmp_path / "cache")
    assert (pkg.version, pkg.deb_sha256, pkg.deb) == ("9.9-1", digest, deb)
    docs = list(recipes.iter_package_documents("dict-devil", pkg.root, Counter()))
    assert docs == [("dict-devil:0", "BORE, n.  A person who talks when you wish him to listen.")]

    def no_download(*a, **k):
        raise AssertionError("a matching cached .deb must not be downloaded again")

    monkeypatch.setattr(recipes, "apt_candidate", lambda package: recipes.AptCandidate("9.9-1", digest))
    monkeypatch.setattr(recipes, "download", no_download)
    (pkg.root / "marker").write_text("kept")  # the unpacked tree is reused, not unpacked again
    assert recipes.prepare_package("dict-devil", tmp_path / "cache").root == pkg.root
    assert (pkg.root / "marker").exists()


# ----------------------------------------------------------------------------------- user sources
@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    d = tmp_path / "user"
    d.mkdir()
    pq.write_table(
        pa.table({
            "body": ["The first parquet document, long.", None, "tiny", "   \n ", "Another parquet document."],
            "key": [1, 2, 3, 4, 5],
        }),
        d / "a.parquet",
    )
    lines = [
        b'{"key": "1", "body": "A JSON line document that is long enough."}',
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"key": "x", "body": null}',
        b'{"key": "y", "body": 42}',
        b'{"key": "z", "body": "Invalid bytes \xff\xfe inside this line."}',
        b'{"key": "s", "body": "A lone surrogate \\ud800 in an escape."}',
    ]
    (d / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    t = d / "texts"
    (t / "sub").mkdir(parents=True)
    (t / "one.txt").write_bytes(b"\xef\xbb\xbfFirst paragraph of one.\r\n\r\nSecond paragraph of one.\r\n  \n\nok\n")
    (t / "sub" / "two.txt").write_bytes("Caf\u00e9 latin-1 text in file two.".encode("latin-1"))
    (t / "image.bin").write_bytes(b"\x89PNG\x00\x00\x00binary")
    (t / ".hidden").write_text("A hidden file that must be ignored entirely.")
    return d


def test_user_sources_counts_ids_and_text(tmp_path, user_files) -> None:
    c = cfg(
        {"kind": "parquet", "path": "user/a.parquet", "text_field": "body", "id_field": "key"},
        {"kind": "jsonl", "path": "user/b.jsonl", "text_field": "body", "id_field": "key"},
        {"kind": "text", "path": "user/texts", "split": "paragraph"},
        {"kind": "text", "path": "user/texts/*.txt"},
    )
    m = build(tmp_path, c)
    rows = read_all(tmp_path / "corpus")
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids))
    assert ids == [
        "user/a.parquet:1",
        "user/a.parquet:5",
        "user/b.jsonl:1",  # the same raw id as the parquet row, made unique by the source label
        "user/b.jsonl:z",
        "user/b.jsonl:s",
        "user/texts:user/texts/one.txt:0",
        "user/texts:user/texts/one.txt:1",
        "user/texts:user/texts/sub/two.txt:0",
        "user/texts/*.txt:0",
    ]
    text = {r[0]: r[2] for r in rows}
    assert text["user/b.jsonl:z"] == "Invalid bytes \ufffd\ufffd inside this line."
    assert text["user/b.jsonl:s"] == "A lone surrogate \ufffd in an escape."
    assert text["user/texts:user/texts/one.txt:0"] == "First paragraph of one."  # BOM and CR gone
    assert text["user/texts:user/texts/sub/two.txt:0"] == "Caf\ufffd latin-1 text in file two."
    assert text["user/texts/*.txt:0"] == "First paragraph of one.\n\nSecond paragraph of one.\n  \n\nok"
    pq_s, js, tx, glob_s = m["sources"]
    assert pq_s["skipped"] == {"empty": 1, "not_text": 1, "short": 1}
    assert js["skipped"] == {"bad_json": 1, "blank_line": 1, "not_an_object": 1, "not_text": 2}
    assert js["notes"] == {"replaced_invalid_utf8": 2}
    assert tx["skipped"] == {"binary_file": 1, "short": 1} and tx["notes"] == {"replaced_invalid_utf8": 1}
    assert tx["origin"] == {"path": "user/texts", "files": 3} and glob_s["origin"]["files"] == 1
    assert m["skipped"]["not_text"] == 3 and m["docs"] == 9
    assert set(m["provenance"]["inputs"]) == {"user/a.parquet", "user/b.jsonl", "user/texts", "user/texts/*.txt"}


def test_same_path_twice_gets_distinct_labels(tmp_path, user_files) -> None:
    src = {"kind": "jsonl", "path": "user/b.jsonl", "text_field": "body"}
    build(tmp_path, cfg(src, src))
    sources = [r[1] for r in read_all(tmp_path / "corpus")]
    assert sources == ["user/b.jsonl#0"] * 3 + ["user/b.jsonl#1"] * 3


PQ = {"kind": "parquet", "path": "user/a.parquet"}
JS = {"kind": "jsonl", "path": "user/b.jsonl"}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (PQ | {"text_field": "text"}, r"a\.parquet: no column 'text' \(corpus\.sources\[0\]\.text_field\)"),
        (PQ | {"text_field": "body", "id_field": "nope"}, r"no column 'nope' \(corpus\.sources\[0\]\.id_field\)"),
        (PQ | {"text_field": "key"}, r"column 'key' .* is int64, not a string column"),
        (JS | {"text_field": "text"}, r"b\.jsonl:1: no field 'text' \(corpus\.sources\[0\]\.text_field\)"),
        ({"kind": "text", "path": "user/missing.txt"}, r"sources\[0\]\.path: 'user/missing\.txt' does not exist"),
        ({"kind": "text", "path": "user/*.md"}, r"corpus\.sources\[0\]\.path: 'user/\*\.md' matches no text files"),
        ({"kind": "jsonl", "path": "user/texts"}, r"corpus\.sources\[0\]\.path: 'user/texts' matches no jsonl files"),
    ],
)
def test_bad_file_sources_fail_before_writing(tmp_path, user_files, source, message) -> None:
    with pytest.raises(CorpusError, match=message):
        build(tmp_path, cfg(source))
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "corpus.json").exists()


def test_duplicate_ids_within_a_source_fail_and_keep_old_output(tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "text": "A perfectly fine document."}) + "\n")
    build(tmp_path, cfg({"kind": "jsonl", "path": "good.jsonl", "id_field": "id"}))
    before = (tmp_path / "corpus" / "manifest.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": "a", "text": f"Document number {i} of two."}) + "\n" for i in range(2)))
    with pytest.raises(CorpusError, match=r"corpus\.sources\[0\]\.id_field: id 'a' occurs twice"):
        build(tmp_path, cfg({"kind": "jsonl", "path": "bad.jsonl", "id_field": "id"}))
    assert (tmp_path / "corpus" / "manifest.json").read_bytes() == before  # atomic: untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_empty_corpus_after_filtering_is_an_error(tmp_path) -> None:
    (tmp_path / "t.txt").write_text("short\n\nalso short\n\n   \n")
    with pytest.raises(CorpusError, match=r"no documents left after filtering \(min_chars=16\)"):
        build(tmp_path, cfg({"kind": "text", "path": "t.txt", "split": "paragraph"}))
    assert not (tmp_path / "corpus").exists()


def test_min_chars_and_max_docs(tmp_path) -> None:
    (tmp_path / "t.txt").write_text("\n\n".join(["x" * n for n in (3, 10, 20, 30, 40, 50)]))
    m = build(tmp_path, cfg({"kind": "text", "path": "t.txt", "split": "paragraph", "max_docs": 2}, min_chars=10))
    assert [len(r[2]) for r in read_all(tmp_path / "corpus")] == [10, 20]
    assert m["sources"][0]["skipped"] == {"short": 1} and m["sources"][0]["truncated"] is True


# ------------------------------------------------------------------------------------ determinism
def test_deterministic_sharded_output(tmp_path, user_files, dict_root, fortune_root, monkeypatch) -> None:
    fake_debian(monkeypatch, {"dict-jargon": dict_root, "fortunes": fortune_root})
    c = cfg(
        {"kind": "debian", "package": "dict-jargon"},
        {"kind": "debian", "package": "fortunes"},
        {"kind": "jsonl", "path": "user/b.jsonl", "text_field": "body"},
        {"kind": "text", "path": "user/texts", "split": "paragraph"},
    )
    m1 = build(tmp_path, c, "one", docs_per_shard=5)
    m2 = build(tmp_path, c, "two", docs_per_shard=5)
    assert [s["rows"] for s in m1["shards"]] == [5, 5, 2]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    assert m1["sha256"] == m2["sha256"]
    assert len(read_all(tmp_path / "one")) == m1["docs"] == 12


# -------------------------------------------------------------------------------------- synthetic
def test_synthetic_source(tmp_path) -> None:
    pytest.importorskip("moe_study.data.synthetic")
    c = cfg({"kind": "synthetic", "docs": 60, "seed": 3}, {"kind": "synthetic", "docs": 20, "seed": 4})
    m = build(tmp_path, c)
    rows = read_all(tmp_path / "corpus")
    assert m["docs"] == len(rows) == 80 - sum(m["skipped"].values())
    assert {r[1] for r in rows} == {"synthetic#0", "synthetic#1"}
    assert all(r[0].startswith(r[1] + ":") for r in rows)
    assert m["sources"][0]["origin"]["params"]["seed"] == 3


# -------------------------------------------------------------------------------------------- CLI
def test_cli(tmp_path, tiny_params, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"Document {i}: some words about the number {i}."}) + "\n" for i in range(7))
    )
    tiny_params["corpus"] = {"sources": [{"kind": "jsonl", "path": "docs.jsonl"}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    assert corpus_stage.main(["--params", "params.yaml"]) == 0
    assert json.loads(Path("work/metrics/corpus.json").read_text())["docs"] == 7
    assert len(read_all(Path("work/corpus"))) == 7

    tiny_params["corpus"]["sources"][0]["text_field"] = "body"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    with pytest.raises(SystemExit) as exc:
        corpus_stage.main(["--params", "params.yaml"])
    assert exc.value.code == 2
    assert "docs.jsonl:1: no field 'body' (corpus.sources[0].text_field)" in capsys.readouterr().err
