"""The train / validation / held-out split by duplicate cluster, after dedupe.

Why by cluster: a held-out document whose near duplicate is in training measures memorisation,
not generalisation. Only the dedupe survivors (keep == True) enter the split, and the side is a
seeded hash of the *cluster id*, so a cluster has one side and its removed members (which are in
no split) could never have landed on the other one. `check_no_crossing` verifies exactly that on
the outputs, counting removed members with their cluster.

The hash is splitmix64 of (cluster id, split.seed) mapped to [0, 1) and compared with
`split.heldout_fraction`: stable across machines and numpy versions (no RNG stream), and a
document keeps its side when other documents are added or removed. The validation split (learning-rate
selection, never reported as the test figure) is the next `split.validation_fraction` of that unit
interval, [heldout_fraction, heldout_fraction + validation_fraction): adding it moves clusters only
from train, so the held-out (test) documents are the same with or without it.

Outputs: work/split/split.parquet (doc int64, split in {train, validation, heldout}; survivors in doc order),
work/split/manifest.json (docs, tokens and bytes per side, provenance) and work/metrics/split.json.
Token counts are the stored document tokens (the token shards hold no EOS; packers add it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_study.cli import progress, setup_logging
from moe_study.config.schema import Params, SplitConfig
from moe_study.data.artefacts import iter_shards, load_manifest
from moe_study.hashing import mix64, sha256_file
from moe_study.io import WORK, atomic_path, read_json, write_json
from moe_study.provenance import provenance

TOKENS_DIR = WORK / "tokens"
DEDUPE_DIR = WORK / "dedupe"
OUT_DIR = WORK / "split"
METRICS = WORK / "metrics" / "split.json"
SIDES = ("train", "heldout", "validation")
SPLIT_SCHEMA = pa.schema([("doc", pa.int64()), ("split", pa.string())])
U64 = np.uint64
BATCH_ROWS = 4096  # token-shard rows decoded at a time: the tokens column is read only for its list lengths


class SplitError(ValueError):
    """Bad or inconsistent split inputs/outputs; the message names the file."""


def _unit(cluster: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """splitmix64(cluster ^ splitmix64(seed)) / 2^64: each cluster's point of [0, 1)."""
    key = mix64(np.array([cfg.seed & ((1 << 64) - 1)], dtype=U64))[0]
    u = (mix64(np.asarray(cluster, dtype=np.int64).astype(U64) ^ key) >> U64(11)).astype(np.float64)
    return u * (1.0 / (1 << 53))


def heldout_mask(cluster: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """True where the cluster goes to held-out: its point of [0, 1) < heldout_fraction."""
    return _unit(cluster, cfg) < cfg.heldout_fraction


def validation_mask(cluster: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """True where the cluster goes to validation: heldout_fraction <= point < heldout + validation fraction."""
    u = _unit(cluster, cfg)
    return (u >= cfg.heldout_fraction) & (u < cfg.heldout_fraction + cfg.validation_fraction)


def read_clusters(dedupe_dir: Path) -> tuple[pa.Table, dict[str, Any]]:
    """clusters.parquet, checked against the dedupe manifest (hash, columns, rows)."""
    m = read_json(dedupe_dir / "manifest.json")
    path = dedupe_dir / "clusters.parquet"
    if not path.exists():
        raise SplitError(f"{path}: missing (run the dedupe stage first)")
    if sha256_file(path) != m.get("clusters", {}).get("sha256"):
        raise SplitError(f"{path}: sha256 differs from {dedupe_dir / 'manifest.json'} (corrupt or stale)")
    try:
        t = pq.read_table(path, columns=["doc", "cluster", "keep"])
    except (pa.ArrowInvalid, OSError) as err:
        raise SplitError(f"{path}: unreadable or lacks columns doc/cluster/keep ({err})") from None
    if t.num_rows == 0:
        raise SplitError(f"{path}: no documents")
    return t, m


def token_counts(tokens_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, tokens, n_bytes) per document, streamed from the token shards.

    Memory stays flat in the corpus size apart from the 24 B per document returned: batches are
    small (`BATCH_ROWS`; the tokens column is decoded only for its list lengths) and are written
    straight into arrays preallocated from the manifest's row counts. Collecting per-batch arrays
    and concatenating would hold everything twice and leave thousands of small arrays between the
    large decode buffers, which fragments the heap (RSS grew ~200 B per document that way).
    """
    m = load_manifest(tokens_dir)
    total = sum(int(s["rows"]) for s in m["shards"])
    if total == 0:
        raise SplitError(f"{tokens_dir}: the token shards hold no documents")
    doc, toks, nbytes = (np.empty(total, dtype=np.int64) for _ in range(3))
    at = 0
    pool = pa.default_memory_pool()
    batches = iter_shards(tokens_dir, columns=["doc", "n_bytes", "tokens"], batch_rows=BATCH_ROWS)
    for b in progress(batches, total=None, desc=f"split: reading {total} docs", unit="batch"):
        k = b.num_rows
        if at + k > total:  # iter_shards checks each shard's rows; this guards the sum
            raise SplitError(f"{tokens_dir}: the shards hold more rows than manifest.json lists ({total})")
        doc[at : at + k] = b.column("doc").to_numpy(zero_copy_only=False)
        toks[at : at + k] = pc.fill_null(pc.list_value_length(b.column("tokens")), 0).to_numpy()
        nbytes[at : at + k] = pc.fill_null(b.column("n_bytes"), 0).to_numpy()
        at += k
        pool.release_unused()
    if at != total:
        raise SplitError(f"{tokens_dir}: the shards hold {at} rows, manifest.json lists {total}")
    return doc, toks, nbytes


def make_split(clusters: pa.Table, cfg: SplitConfig) -> pa.Table:
    """The survivors in doc order with their side."""
    keep = clusters.column("keep").to_numpy(zero_copy_only=False)
    doc = clusters.column("doc").to_numpy()[keep]
    held = heldout_mask(clusters.column("cluster").to_numpy()[keep], cfg)
    val = validation_mask(clusters.column("cluster").to_numpy()[keep], cfg)
    order = np.argsort(doc, kind="stable")
    side = np.where(held[order], SIDES[1], np.where(val[order], SIDES[2], SIDES[0]))
    return pa.table({"doc": pa.array(doc[order], pa.int64()), "split": pa.array(side.tolist(), pa.string())},
                    schema=SPLIT_SCHEMA)


def check_no_crossing(clusters: pa.Table, split: pa.Table) -> dict[str, int]:
    """Raise SplitError unless every duplicate cluster lies on one side of the split.

    Checks: split docs are unique survivors and every survivor is in the split; then every doc of
    the clusters table (removed ones included) is given its cluster's side, and no cluster may
    have members on both sides. Returns the per-side doc counts including removed members.
    """
    c_doc = clusters.column("doc").to_numpy()
    c_cluster = clusters.column("cluster").to_numpy()
    c_keep = clusters.column("keep").to_numpy(zero_copy_only=False)
    s_doc = split.column("doc").to_numpy()
    s_side = split.column("split")
    bad = pc.unique(pc.filter(s_side, pc.invert(pc.is_in(s_side, pa.array(SIDES))))).to_pylist()
    if bad or s_side.null_count:
        raise SplitError(f"split holds values other than {SIDES}: {bad[:5]}")
    kept_docs = c_doc[c_keep]
    if not np.array_equal(c_cluster[c_keep], kept_docs):
        raise SplitError("a surviving doc is not the id of its own cluster (survivor rule broken)")
    if len(np.unique(s_doc)) != len(s_doc):
        raise SplitError("a doc appears more than once in the split")
    order = np.argsort(c_doc, kind="stable")
    at = np.minimum(np.searchsorted(c_doc[order], s_doc), max(0, len(c_doc) - 1))
    found = c_doc[order][at] == s_doc if len(c_doc) else np.zeros(len(s_doc), dtype=bool)
    if not found.all():
        raise SplitError(f"split docs not in the dedupe clusters: {s_doc[~found][:5].tolist()}")
    rows = order[at]
    if len(rows) and not c_keep[rows].all():
        raise SplitError(f"removed duplicate(s) in the split, e.g. doc {int(s_doc[~c_keep[rows]][0])}")
    if len(rows) != int(c_keep.sum()):
        raise SplitError(f"{int(c_keep.sum()) - len(rows)} surviving doc(s) are in no split")
    code = np.zeros(len(s_doc), dtype=np.int8)  # 0 train, 1 held-out, 2 validation
    for k, name in enumerate(SIDES):
        code[pc.equal(s_side, name).to_numpy(zero_copy_only=False)] = k
    # side of each cluster from its split members: all on one side
    ids, inv = np.unique(c_cluster, return_inverse=True)
    lo = np.full(len(ids), 3, dtype=np.int8)
    hi = np.full(len(ids), -1, dtype=np.int8)
    np.minimum.at(lo, inv[rows], code)
    np.maximum.at(hi, inv[rows], code)
    crossing = ids[(hi >= 0) & (lo != hi)]
    if len(crossing):
        raise SplitError(f"{len(crossing)} cluster(s) cross the split, e.g. cluster {int(crossing[0])}")
    orphan = ids[hi < 0]
    if len(orphan):
        raise SplitError(f"{len(orphan)} cluster(s) have no survivor in the split, e.g. {int(orphan[0])}")
    member = hi[inv]
    return {
        "clusters": len(ids),
        "train_docs_incl_removed": int((member == 0).sum()),
        "heldout_docs_incl_removed": int((member == 1).sum()),
        "validation_docs_incl_removed": int((member == 2).sum()),
    }


def run_split(
    p: Params,
    tokens_dir: Path = TOKENS_DIR,
    dedupe_dir: Path = DEDUPE_DIR,
    out_dir: Path = OUT_DIR,
    metrics_path: Path = METRICS,
) -> dict[str, Any]:
    log = setup_logging("split")
    tokens_dir, dedupe_dir, out_dir = Path(tokens_dir), Path(dedupe_dir), Path(out_dir)
    clusters, dm = read_clusters(dedupe_dir)
    tm = load_manifest(tokens_dir)
    if dm.get("provenance", {}).get("inputs", {}).get("tokens") != tm["sha256"]:
        raise SplitError(f"{dedupe_dir}: made from other token shards than {tokens_dir} (re-run dedupe)")
    doc, ntok, nbytes = token_counts(tokens_dir)
    c_doc = clusters.column("doc").to_numpy()
    if len(doc) != len(c_doc) or not np.array_equal(doc, c_doc):
        raise SplitError(f"{dedupe_dir / 'clusters.parquet'}: docs differ from {tokens_dir} (re-run dedupe)")
    split = make_split(clusters, p.split)
    check = check_no_crossing(clusters, split)
    keep = clusters.column("keep").to_numpy(zero_copy_only=False)
    held = np.zeros(len(doc), dtype=bool)
    held[keep] = heldout_mask(clusters.column("cluster").to_numpy()[keep], p.split)
    val = np.zeros(len(doc), dtype=bool)
    val[keep] = validation_mask(clusters.column("cluster").to_numpy()[keep], p.split)
    train = keep & ~held & ~val
    stats = {
        "train_docs": int(train.sum()),
        "train_tokens": int(ntok[train].sum()),
        "train_bytes": int(nbytes[train].sum()),
        "heldout_docs": int(held.sum()),
        "heldout_tokens": int(ntok[held].sum()),
        "heldout_bytes": int(nbytes[held].sum()),
        "validation_docs": int(val.sum()),
        "validation_tokens": int(ntok[val].sum()),
        "validation_bytes": int(nbytes[val].sum()),
        "removed_docs": int((~keep).sum()),
        "removed_tokens": int(ntok[~keep].sum()),
        "heldout_fraction_docs": round(int(held.sum()) / max(1, int(keep.sum())), 6),
        **check,
    }
    if p.split.validation_fraction > 0 and stats["validation_docs"] == 0:
        raise SplitError(
            f"split.validation_fraction={p.split.validation_fraction} over {int(keep.sum())} surviving docs leaves "
            "no validation doc (raise it, or set it to 0 for no validation split)")
    if stats["heldout_docs"] == 0 or stats["train_docs"] == 0:
        raise SplitError(
            f"split.heldout_fraction={p.split.heldout_fraction} over {int(keep.sum())} surviving docs leaves "
            f"{stats['train_docs']} train and {stats['heldout_docs']} held-out docs; both must be > 0 "
            "(change split.heldout_fraction or split.seed, or add corpus sources)"
        )
    prov = provenance(
        "split",
        {"tokens": tm["sha256"], "dedupe_clusters": dm["clusters"]["sha256"]},
        {"split": p.split.model_dump()},
    )
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(split, tmp / "split.parquet", compression="zstd",
                       row_group_size=max(1, split.num_rows))
        sha = sha256_file(tmp / "split.parquet")
        manifest = {**stats, "split": {"file": "split.parquet", "rows": split.num_rows, "sha256": sha},
                    "sha256": sha, "provenance": prov}
        write_json(tmp / "manifest.json", manifest)
    write_json(metrics_path, {**stats, "provenance": prov})
    log.info("train %d docs / %d tokens, validation %d docs / %d tokens, held-out %d docs / %d tokens / %d bytes "
             "(%d removed duplicates)", stats["train_docs"], stats["train_tokens"], stats["validation_docs"],
             stats["validation_tokens"], stats["heldout_docs"], stats["heldout_tokens"], stats["heldout_bytes"],
             stats["removed_docs"])
    return manifest
