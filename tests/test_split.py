"""Train / held-out split by dedupe cluster: no cluster crosses it, deterministic, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dedupe_helpers import write_token_shards

from moe_study.config.schema import parse_params
from moe_study.data import dedupe as D
from moe_study.data import split as S
from moe_study.data.synthetic import generate
from stages import dedupe as dedupe_stage
from stages import split as split_stage


def params(fraction: float = 0.2, seed: int = 7, validation: float = 0.02) -> object:
    return parse_params({
        "study": "t",
        "corpus": {"sources": [{"kind": "synthetic"}]},
        "dedupe": {"ngram": 5, "num_perm": 64, "bands": 16, "rows": 4, "threshold": 0.7},
        "split": {"heldout_fraction": fraction, "seed": seed, "validation_fraction": validation},
        "budget": {"params": 30000, "compute": 1e10, "unique_tokens": 5000},
        "runs": {"dense": {"kind": "dense"}},
    })


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Token shards of a planted corpus (many duplicates) and their dedupe output."""
    root = tmp_path_factory.mktemp("split")
    c = generate(1500, 0.15, 0.15, seed=3)
    write_token_shards(root / "tokens", c.texts, c.ids, docs_per_shard=500)
    D.run_pipeline(params(), root / "tokens", root / "dedupe", root / "m_dedupe.json", threads=1)
    return root, c


def run(root, name: str, p=None) -> dict:
    return S.run_split(p or params(), root / "tokens", root / "dedupe", root / name, root / f"{name}.json")


def test_split_by_cluster_no_crossing(work):
    root, c = work
    man = run(root, "split")
    clusters = pq.read_table(root / "dedupe" / "clusters.parquet")
    split = pq.read_table(root / "split" / "split.parquet")
    check = S.check_no_crossing(clusters, split)
    keep = clusters.column("keep").to_numpy(zero_copy_only=False)
    assert split.num_rows == keep.sum() == man["train_docs"] + man["heldout_docs"] + man["validation_docs"]
    assert (check["train_docs_incl_removed"] + check["heldout_docs_incl_removed"]
            + check["validation_docs_incl_removed"]) == len(c)
    # the planted copies really were clustered (so the check covers real clusters) ...
    assert (~keep).sum() >= 400
    # ... and every planted copy lands with its original, on the original's side
    side = dict(zip(split.column("doc").to_pylist(), split.column("split").to_pylist(), strict=True))
    cl = clusters.column("cluster").to_numpy()
    for i, d in enumerate(c.dup_of):
        if d >= 0 and cl[i] == cl[d]:
            assert side[int(cl[i])] == side[int(cl[d])]
    frac = man["heldout_docs"] / split.num_rows
    assert 0.15 < frac < 0.25
    # token totals agree with the token shards
    toks = pa.concat_tables([pq.read_table(f) for f in sorted((root / "tokens").glob("tokens-*.parquet"))])
    n_tokens = pc.sum(pc.list_value_length(toks.column("tokens"))).as_py()
    assert man["train_tokens"] + man["heldout_tokens"] + man["validation_tokens"] + man["removed_tokens"] == n_tokens
    assert man["heldout_bytes"] > 0 and man["provenance"]["inputs"]["dedupe_clusters"] == man_sha(root)
    metrics = json.loads((root / "split.json").read_text())
    assert metrics["train_tokens"] == man["train_tokens"]


def man_sha(root) -> str:
    return json.loads((root / "dedupe" / "manifest.json").read_text())["clusters"]["sha256"]


def test_split_deterministic_and_seeded(work):
    root, _ = work
    run(root, "s1")
    run(root, "s2")
    for f in ("split.parquet", "manifest.json"):
        assert (root / "s1" / f).read_bytes() == (root / "s2" / f).read_bytes()
    assert (root / "s1.json").read_bytes() == (root / "s2.json").read_bytes()
    run(root, "s3", params(seed=8))
    a = pq.read_table(root / "s1" / "split.parquet").column("split").to_pylist()
    b = pq.read_table(root / "s3" / "split.parquet").column("split").to_pylist()
    assert a != b


def test_validation_split_comes_from_train_and_leaves_heldout_unchanged(work):
    """Issue 14: train / validation / held-out by cluster; the held-out (test) docs do not move."""
    root, c = work
    run(root, "v0", params(validation=0.0))
    man = run(root, "v1", params(validation=0.1))
    a = pq.read_table(root / "v0" / "split.parquet").to_pydict()
    b = pq.read_table(root / "v1" / "split.parquet").to_pydict()
    sa, sb = dict(zip(a["doc"], a["split"], strict=True)), dict(zip(b["doc"], b["split"], strict=True))
    assert "validation" not in sa.values() and sa.keys() == sb.keys()
    assert {d for d, s in sa.items() if s == "heldout"} == {d for d, s in sb.items() if s == "heldout"}
    val = {d for d, s in sb.items() if s == "validation"}
    assert val and all(sa[d] == "train" for d in val)
    assert 0.06 < len(val) / len(sb) < 0.14 and man["validation_docs"] == len(val) and man["validation_tokens"] > 0
    S.check_no_crossing(pq.read_table(root / "dedupe" / "clusters.parquet"), pq.read_table(root / "v1/split.parquet"))
    from moe_study.data.heldout import load_heldout
    from moe_study.data.shards import train_docs

    assert not set(train_docs(root / "v1" / "split.parquet").tolist()) & val
    assert {d.doc for d in load_heldout(root / "tokens", root / "v1" / "split.parquet", side="validation")} == val


def test_check_rejects_crossing_and_leaks(work):
    root, _ = work
    run(root, "split")
    clusters = pq.read_table(root / "dedupe" / "clusters.parquet")
    split = pq.read_table(root / "split" / "split.parquet")
    keep = clusters.column("keep").to_numpy(zero_copy_only=False)
    doc, cl = clusters.column("doc").to_numpy(), clusters.column("cluster").to_numpy()
    removed = int(doc[~keep][0])
    # a removed duplicate put on the other side of its survivor
    survivor_side = split.column("split").to_pylist()[split.column("doc").to_pylist().index(int(cl[~keep][0]))]
    other = "train" if survivor_side == "heldout" else "heldout"
    leak = pa.concat_tables([split, pa.table({"doc": pa.array([removed], pa.int64()), "split": [other]})])
    with pytest.raises(S.SplitError, match="removed duplicate"):
        S.check_no_crossing(clusters, leak)
    # a split by document instead of by cluster: keep every doc, two members of a cluster differ
    all_kept = clusters.set_column(3, "keep", pa.array(np.ones(len(doc), dtype=bool)))
    by_doc = pa.table({"doc": pa.array(doc, pa.int64()),
                       "split": np.where(doc == removed, other, survivor_side).tolist()})
    with pytest.raises(S.SplitError, match="survivor rule|cross"):
        S.check_no_crossing(all_kept, by_doc)
    # a survivor missing from the split, and a bad label
    with pytest.raises(S.SplitError, match="in no split"):
        S.check_no_crossing(clusters, split.slice(1))
    bad = split.set_column(1, "split", pa.array(["test"] + split.column("split").to_pylist()[1:]))
    with pytest.raises(S.SplitError, match="other than"):
        S.check_no_crossing(clusters, bad)


def test_split_errors(work, tmp_path):
    root, _ = work
    with pytest.raises(S.SplitError, match="both must be > 0"):
        run(root, "tiny", params(fraction=1e-6))
    assert not (root / "tiny").exists()
    # dedupe made from other tokens: stale
    write_token_shards(tmp_path / "tokens", ["a b c d e f", "g h i j k l"])
    with pytest.raises(S.SplitError, match="other token shards"):
        S.run_split(params(), tmp_path / "tokens", root / "dedupe", tmp_path / "o", tmp_path / "m.json")
    # a corrupt clusters file
    (tmp_path / "dedupe").mkdir()
    (tmp_path / "dedupe" / "manifest.json").write_text((root / "dedupe" / "manifest.json").read_text())
    (tmp_path / "dedupe" / "clusters.parquet").write_bytes(b"junk")
    with pytest.raises(S.SplitError, match="sha256 differs"):
        S.run_split(params(), root / "tokens", tmp_path / "dedupe", tmp_path / "o", tmp_path / "m.json")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        S.run_split(params(), root / "tokens", tmp_path / "nodedupe", tmp_path / "o", tmp_path / "m.json")


def test_stages_from_the_command_line(tmp_path, monkeypatch, tiny_params):
    """`python -m stages.dedupe` then `python -m stages.split` with the default paths of the registry."""
    import yaml

    from moe_study.registry import stage

    c = generate(400, 0.05, 0.05, seed=3)
    write_token_shards(tmp_path / "work" / "tokens", c.texts, c.ids, docs_per_shard=150)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    monkeypatch.chdir(tmp_path)
    assert dedupe_stage.main([]) == 0
    assert split_stage.main([]) == 0
    for name in ("dedupe", "split"):
        for out in stage(name).all_outs:
            assert (tmp_path / out).exists(), out
    assert sorted(p.name for p in (tmp_path / "work" / "dedupe").iterdir()) == ["clusters.parquet", "manifest.json"]
    assert sorted(p.name for p in (tmp_path / "work" / "split").iterdir()) == ["manifest.json", "split.parquet"]
    man = json.loads((tmp_path / "work" / "split" / "manifest.json").read_text())
    assert man["train_docs"] > 0 and man["heldout_docs"] > 0
