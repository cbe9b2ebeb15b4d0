"""Dedupe core, standalone text mode and pipeline stage: quality on planted duplicates, rules, errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dedupe_helpers import byte_level_bpe, write_token_shards

from moe_study.config.schema import DedupeConfig, parse_params
from moe_study.data import dedupe as D
from moe_study.data import minhash as M
from moe_study.data.synthetic import generate
from moe_study.data.synthetic import score_dedupe as planted_metrics
from stages import dedupe as dedupe_stage

CFG = DedupeConfig()  # ngram 5, 128 perms, 16 x 8 bands, threshold 0.7


@pytest.fixture(scope="module")
def planted():
    return generate(3000, 0.05, 0.05, seed=5)


def params(**dedupe) -> object:
    return parse_params({
        "study": "t",
        "corpus": {"sources": [{"kind": "synthetic"}]},
        "dedupe": {"ngram": 5, "num_perm": 128, "bands": 16, "rows": 8, "threshold": 0.7, **dedupe},
        "budget": {"params": 30000, "compute": 1e10, "unique_tokens": 5000},
        "runs": {"dense": {"kind": "dense"}},
    })


def write_docs(path, ids, texts) -> None:
    pq.write_table(pa.table({"id": ids, "text": texts}), path)


# ------------------------------------------------------------------------------------------ core
def test_text_mode_finds_planted_duplicates(planted):
    res = M.dedupe_texts(planted.texts, CFG, threads=2)
    m = planted_metrics(planted.dup_of, planted.kind, res.keep, res.cluster)
    assert m["planted"] == 300
    assert m["recall"] >= 0.95, m
    assert m["false_removal"] <= 0.01, m
    assert m["precision"] >= 0.99, m
    # without the exact pass, exact copies are still found (Jaccard 1) but labelled near
    res2 = M.dedupe_texts(planted.texts, CFG.model_copy(update={"exact": False}), threads=1)
    m2 = planted_metrics(planted.dup_of, planted.kind, res2.keep, res2.cluster)
    assert m2["recall"] >= 0.95 and m2["false_removal"] <= 0.01, m2
    assert res2.stats["removed_exact"] == 0 and res2.stats["removed_near"] >= 285


def test_thread_count_does_not_change_results(planted):
    one = M.dedupe_texts(planted.texts, CFG, threads=1, batch_docs=256)
    three = M.dedupe_texts(planted.texts, CFG, threads=3, batch_docs=256)
    np.testing.assert_array_equal(one.cluster, three.cluster)
    np.testing.assert_array_equal(one.reason, three.reason)
    assert one.stats == three.stats
    # a document's signature does not depend on the batch it is in
    v, o = M.text_to_ints(planted.texts[:300])
    whole = M.MinHasher(CFG).signatures(v, o)
    v2, o2 = M.text_to_ints(planted.texts[100:300])
    np.testing.assert_array_equal(whole[100:], M.MinHasher(CFG).signatures(v2, o2))


def test_signatures_estimate_jaccard(planted):
    near = [i for i, k in enumerate(planted.kind) if k == "near"][:60]
    texts = [t for i in near for t in (planted.texts[i], planted.texts[planted.dup_of[i]])]
    sig = M.MinHasher(CFG).signatures(*M.text_to_ints(texts))
    pairs = np.arange(len(texts)).reshape(-1, 2)
    est = M.estimated_jaccard(sig, pairs)
    true = np.array([planted.jaccard[i] for i in near])
    assert np.abs(est - true).mean() < 0.05  # 128 perms: sd ~ 0.035 per pair


def test_exact_duplicates_and_survivor_rule():
    base = "the quick brown fox jumps over the lazy dog and runs far away into the woods today"
    other = "an entirely different sentence about numbers and letters that shares nothing at all here"
    texts = [other, "  " + base.upper() + "\n", base, other.replace(" ", "   "), base + " ", ""]
    res = M.dedupe_texts(texts, CFG)
    # docs 1, 2, 4 are one text after normalisation: survivor is the lowest index (1)
    assert res.cluster.tolist() == [0, 1, 1, 0, 1, 5]
    assert res.keep.tolist() == [True, True, False, False, False, True]
    assert res.reasons() == ["unique", "unique", "exact", "exact", "exact", "unique"]
    assert res.stats["empty_docs"] == 1
    # reversed order: the survivor is again the lowest index of each cluster
    rev = M.dedupe_texts(texts[::-1], CFG)
    assert rev.cluster.tolist() == [0, 1, 2, 1, 1, 2]


def test_short_and_empty_documents():
    texts = ["hello world", "Hello   WORLD", "", None, "one two three", "hello world again"]
    res = M.dedupe_texts(texts, CFG)
    assert res.stats["empty_docs"] == 2
    assert res.cluster.tolist() == [0, 0, 2, 2, 4, 5]  # empty docs are exact duplicates of each other
    # with exact off, identical short docs (one shingle each) still match through LSH; empties never
    res2 = M.dedupe_texts(texts, CFG.model_copy(update={"exact": False}))
    assert res2.cluster.tolist() == [0, 0, 2, 3, 4, 5]
    assert res2.reasons()[1] == "near"


def test_text_to_ints_words():
    v, o = M.text_to_ints(["A b  a", "", "b\tA", "é é"])
    assert o.tolist() == [0, 3, 3, 5, 7]
    assert v[0] == v[2] == v[4] and v[1] == v[3] and v[0] != v[1]
    assert v[5] == v[6] and v[5] not in (v[0], v[1])
    # a word's hash depends on its bytes only, not on where it sits in the batch
    assert M.text_to_ints(["foo"])[0][0] == M.text_to_ints(["x y", "zz foo"])[0][3]
    # very long words (beyond the 4096-byte power table) and long documents are fine
    long_a, long_b = "ab" * 6000, "ab" * 5999 + "ba"
    lv, lo = M.text_to_ints([f"{long_a} {long_b} {long_a}", "w " * 50_000])
    assert lo.tolist() == [0, 3, 50_003] and lv[0] == lv[2] != lv[1]


def test_components_match_reference_union_find():
    rng = random.Random(0)
    n = 300
    edges = np.array([(rng.randrange(n), rng.randrange(n)) for _ in range(260)], dtype=np.int64)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    expect = [find(x) for x in range(n)]
    members: dict[int, list[int]] = {}
    for x, r in enumerate(expect):
        members.setdefault(r, []).append(x)
    expect_min = [min(members[r]) for r in expect]
    assert M.components(n, edges).tolist() == expect_min


def test_big_bucket_is_clustered():
    # 200 identical documents with exact hashing off: one LSH bucket far above MAX_BUCKET_PAIRS
    res = M.dedupe_texts(["same words in every single document here"] * 200,
                         CFG.model_copy(update={"exact": False}))
    assert set(res.cluster.tolist()) == {0} and res.keep.sum() == 1


# ------------------------------------------------------------------------------------ standalone
def test_standalone_deterministic_and_correct(tmp_path, planted):
    src = tmp_path / "docs.parquet"
    write_docs(src, planted.ids, planted.texts)
    out1, out2 = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert dedupe_stage.main(["--input", str(src), "--output", str(out1), "--threads", "2"]) == 0
    assert dedupe_stage.main(["--input", str(src), "--output", str(out2), "--threads", "1"]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    t = pq.read_table(out1)
    assert t.schema.names == ["id", "cluster", "keep"] and t.num_rows == len(planted)
    assert t.column("id").to_pylist() == planted.ids
    keep = t.column("keep").to_numpy(zero_copy_only=False)
    m = planted_metrics(planted.dup_of, planted.kind, keep, t.column("cluster").to_numpy())
    assert m["recall"] >= 0.95 and m["false_removal"] <= 0.01 and m["precision"] >= 0.99, m
    assert not list(tmp_path.glob(".tmp-*"))


def test_standalone_options(tmp_path, planted):
    src = tmp_path / "docs.parquet"
    write_docs(src, planted.ids[:400], planted.texts[:400])
    out = tmp_path / "o.parquet"
    assert dedupe_stage.main(["--input", str(src), "--output", str(out), "--ngram", "3", "--num-perm", "64",
                   "--bands", "16", "--rows", "4", "--threshold", "0.6"]) == 0
    assert pq.read_table(out).num_rows == 400


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        dedupe_stage.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_standalone_errors(tmp_path, capsys):
    out = str(tmp_path / "out.parquet")
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), nocol)
    err = _error(capsys, ["--input", str(nocol), "--output", out])
    assert "nocol.parquet" in err and "'text'" in err
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty)
    err = _error(capsys, ["--input", str(empty), "--output", out])
    assert "empty.parquet" in err and "no documents" in err
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    assert "junk.parquet" in _error(capsys, ["--input", str(junk), "--output", out])
    assert "not found" in _error(capsys, ["--input", str(tmp_path / "nope.parquet"), "--output", out])
    badtype = tmp_path / "badtype.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": [1]}), badtype)
    assert "expected string" in _error(capsys, ["--input", str(badtype), "--output", out])
    ok = tmp_path / "ok.parquet"
    write_docs(ok, ["a"], ["x y z"])
    assert "num_perm" in _error(capsys, ["--input", str(ok), "--output", out, "--bands", "64", "--rows", "4"])
    assert "--output" in _error(capsys, ["--input", str(ok)])
    assert not (tmp_path / "out.parquet").exists()


def test_standalone_counts_empty_and_null_texts(tmp_path):
    src = tmp_path / "d.parquet"
    write_docs(src, ["a", "b", "c", "d"], ["some text here", None, "", "   "])
    stats = D.dedupe_file(src, tmp_path / "o.parquet", CFG)
    assert stats["empty_docs"] == 3 and stats["null_texts"] == 1
    t = pq.read_table(tmp_path / "o.parquet")
    assert t.column("cluster").to_pylist() == [0, 1, 1, 1]


# -------------------------------------------------------------------------------------- pipeline
def test_pipeline_stage(tmp_path, planted):
    sources = ["alpha" if i % 3 else "beta" for i in range(len(planted))]
    write_token_shards(tmp_path / "tokens", planted.texts, planted.ids, sources, docs_per_shard=700)
    p = params()
    outs = []
    for k in (1, 2):
        out, met = tmp_path / f"dedupe{k}", tmp_path / f"metrics{k}.json"
        D.run_pipeline(p, tmp_path / "tokens", out, met, threads=k)
        outs.append((out, met))
    (o1, m1), (o2, m2) = outs
    for name in ("clusters.parquet", "manifest.json"):
        assert (o1 / name).read_bytes() == (o2 / name).read_bytes()
    assert m1.read_bytes() == m2.read_bytes()
    t = pq.read_table(o1 / "clusters.parquet")
    assert t.schema.names == ["doc", "id", "cluster", "keep", "reason"]
    keep = t.column("keep").to_numpy(zero_copy_only=False)
    cluster = t.column("cluster").to_numpy()
    # word-level tokens keep case: case-changed "exact" copies become near duplicates, still found
    m = planted_metrics(planted.dup_of, planted.kind, keep, cluster)
    assert m["recall"] >= 0.95 and m["false_removal"] <= 0.01, m
    reason = np.array(t.column("reason").to_pylist())
    assert set(reason[keep]) == {"unique"} and set(reason[~keep]) <= {"exact", "near"}
    assert (cluster[keep] == t.column("doc").to_numpy()[keep]).all()
    metrics = json.loads(m1.read_text())
    manifest = json.loads((o1 / "manifest.json").read_text())
    assert metrics["removed_docs"] == int((~keep).sum()) == manifest["docs"] - manifest["kept_docs"]
    assert metrics["removed_exact_docs"] + metrics["removed_near_docs"] == metrics["removed_docs"]
    per = metrics["per_source"]
    assert sorted(per) == ["alpha", "beta"]
    for key in ("docs", "tokens", "removed_docs", "removed_tokens", "removed_exact_docs"):
        assert per["alpha"][key] + per["beta"][key] == metrics[key]
    tokens_manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["provenance"]["inputs"]["tokens"] == tokens_manifest["sha256"]
    assert manifest["clusters"]["sha256"] == manifest["sha256"]
    rec = metrics["planted_recall"]  # issue 14: recall by Jaccard bucket in the stage's metrics
    assert set(rec["by_jaccard"]) == {"0.7-0.8", "0.8-0.9", ">=0.9"} and (rec["bands"], rec["rows"]) == (16, 8)


def test_default_banding_finds_near_duplicates_at_the_threshold():
    """Issue 14: the default S-curve's midpoint lies well below the 0.7 threshold, and on planted pairs
    the recall just above the threshold beats the old 16 x 8 banding (P(candidate | 0.7) ~ 0.61)."""
    cfg = DedupeConfig()
    assert (1 / cfg.bands) ** (1 / cfg.rows) <= 0.6 and cfg.bands * cfg.rows <= cfg.num_perm
    assert D.candidate_probability(cfg.threshold, cfg.bands, cfg.rows) >= 0.95
    assert D.candidate_probability(0.7, 16, 8) == pytest.approx(0.613, abs=1e-3)
    new = D.planted_recall(cfg, pairs=800)
    old = D.planted_recall(DedupeConfig(bands=16, rows=8), pairs=800)
    assert all(b["pairs"] >= 100 for b in new["by_jaccard"].values())
    assert new["by_jaccard"]["0.7-0.8"]["recall"] >= 0.8
    assert new["by_jaccard"]["0.7-0.8"]["recall"] >= old["by_jaccard"]["0.7-0.8"]["recall"] + 0.1
    assert new["by_jaccard"]["0.8-0.9"]["recall"] >= 0.99 and new["by_jaccard"][">=0.9"]["recall"] == 1.0


def test_pipeline_errors(tmp_path, monkeypatch, capsys):
    p = params()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        D.run_pipeline(p, tmp_path / "missing", tmp_path / "o", tmp_path / "m.json")
    # a shard set without the tokens column
    from moe_study.data.artefacts import ShardWriter

    w = ShardWriter(tmp_path / "bad", "tokens", pa.schema([("doc", pa.int64()), ("id", pa.string())]))
    w.write(pa.table({"doc": [0], "id": ["a"]}))
    w.finish()
    with pytest.raises(D.DedupeError, match=r"tokens-00000.parquet.*lacks column"):
        D.run_pipeline(p, tmp_path / "bad", tmp_path / "o", tmp_path / "m.json")
    write_token_shards(tmp_path / "empty", [])
    with pytest.raises(D.DedupeError, match="no token shards|no documents"):
        D.run_pipeline(p, tmp_path / "empty", tmp_path / "o", tmp_path / "m.json")
    assert not (tmp_path / "o").exists()
    # pipeline mode rejects standalone flags
    monkeypatch.chdir(tmp_path)
    assert "standalone" in _error(capsys, ["--ngram", "3"])


def test_pipeline_ignores_whitespace_tokens(tmp_path):
    """Re-wrapped, re-indented copies (the same entry in two dictionaries) match once whitespace
    tokens are dropped; on raw byte-level BPE tokens they mostly do not."""
    orig = generate(300, 0.0, 0.0, seed=9).texts
    rewrapped = []
    for t in orig:
        words = t.split()
        rewrapped.append("".join(w + ("\n    " if k % 9 == 8 else " ") for k, w in enumerate(words)).strip())
    texts = orig + rewrapped
    write_token_shards(tmp_path / "tokens", texts, tokenizer=byte_level_bpe(texts), dtype="uint16")
    found = {}
    for ignore in (True, False):
        out = tmp_path / f"o{ignore}"
        D.run_pipeline(params(ignore_whitespace_tokens=ignore), tmp_path / "tokens", out, tmp_path / "m.json")
        t = pq.read_table(out / "clusters.parquet")
        cluster = t.column("cluster").to_numpy()
        found[ignore] = float((cluster[300:] == np.arange(300)).mean())
    assert found[True] >= 0.95 and found[False] < 0.5, found


def test_pipeline_tokenizer_checks(tmp_path):
    write_token_shards(tmp_path / "tokens", ["a b c d e f", "g h i j k l"])
    (tmp_path / "tokens" / "tokenizer.json").write_text("{}")
    with pytest.raises(D.DedupeError, match="tokenizer.json: sha256 differs"):
        D.run_pipeline(params(), tmp_path / "tokens", tmp_path / "o", tmp_path / "m.json")
    (tmp_path / "tokens" / "tokenizer.json").unlink()
    with pytest.raises(D.DedupeError, match="tokenizer.json: missing"):
        D.run_pipeline(params(), tmp_path / "tokens", tmp_path / "o", tmp_path / "m.json")
    D.run_pipeline(params(ignore_whitespace_tokens=False), tmp_path / "tokens", tmp_path / "o", tmp_path / "m.json")
    assert (tmp_path / "o" / "clusters.parquet").exists()
