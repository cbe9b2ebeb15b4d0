"""The catalogue of bad inputs, through the real stage commands.

Each case is a clear error (exit 2, a message naming the file or field) or a counted skip, never
a traceback from deep inside and never a silently wrong result; and a failing stage leaves its
previous output untouched (outputs are replaced only by an atomic rename at the end).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, make_project, run

from moe_study.hashing import sha256_tree


def with_sources(sources: list[dict]) -> dict:
    p = json.loads(json.dumps(TINY))
    p["corpus"]["sources"] = sources
    return p


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path, TINY)


def stage(project: Path, name: str, check: bool = True):
    return run(["python", "-m", f"stages.{name}"], project, check=check)


def set_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def assert_clean_error(r, *needles: str) -> None:
    text = r.stdout + r.stderr
    assert r.returncode == 2, text
    assert "Traceback" not in text, text
    for n in needles:
        assert n in text, (n, text)


def test_non_utf8_empty_and_short_documents_are_counted(project: Path) -> None:
    docs = project / "mydocs"
    docs.mkdir()
    (docs / "good.txt").write_text("A perfectly ordinary English document about apples and pears.")
    (docs / "latin1.txt").write_bytes("Caf\xe9 au lait is a coffee drink with hot milk, served warm.".encode("latin-1"))
    (docs / "empty.txt").write_text("   \n\n  ")
    (docs / "short.txt").write_text("tiny")
    set_params(project, with_sources([{"kind": "text", "path": "mydocs"}]))
    stage(project, "corpus")
    m = json.loads((project / "work/corpus/manifest.json").read_text())
    assert m["docs"] == 2
    blob = json.dumps(m)
    assert '"empty": 1' in blob and '"short": 1' in blob and '"replaced_invalid_utf8": 1' in blob, blob


def test_empty_corpus_is_a_clear_error_and_keeps_the_old_output(project: Path) -> None:
    stage(project, "corpus")
    before = sha256_tree(project / "work/corpus")
    (project / "nothing").mkdir()
    (project / "nothing/blank.txt").write_text("\n")
    set_params(project, with_sources([{"kind": "text", "path": "nothing"}]))
    assert_clean_error(stage(project, "corpus", check=False), "empty")
    assert sha256_tree(project / "work/corpus") == before


def test_missing_user_file_names_the_file(project: Path) -> None:
    set_params(project, with_sources([{"kind": "parquet", "path": "no/such/file.parquet"}]))
    assert_clean_error(stage(project, "corpus", check=False), "no/such/file.parquet")
    assert not (project / "work/corpus").exists()


def test_jsonl_without_the_text_field_names_file_and_field(project: Path) -> None:
    (project / "d.jsonl").write_text('{"body": "hello there, this is a document"}\n')
    set_params(project, with_sources([{"kind": "jsonl", "path": "d.jsonl", "text_field": "text"}]))
    assert_clean_error(stage(project, "corpus", check=False), "d.jsonl", "text")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_token_shard_stops_the_next_stage(project: Path, damage: str) -> None:
    for name in ("corpus", "tokenize"):
        stage(project, name)
    shard = sorted((project / "work/tokens").glob("tokens-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_clean_error(stage(project, "dedupe", check=False), shard.name)
    assert not (project / "work/dedupe").exists()


def test_missing_upstream_output_names_it(project: Path) -> None:
    assert_clean_error(stage(project, "tokenize", check=False), "work/corpus")
