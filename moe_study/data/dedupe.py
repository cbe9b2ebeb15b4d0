"""Exact and MinHash-LSH near-duplicate clusters of token shards or a Parquet file; one survivor each.

Two entry points, one core (`moe_study/data/minhash.py`):

- Pipeline stage, `python -m stages.dedupe [--params params.yaml]`: reads the token shards
  (work/tokens) and writes work/dedupe/clusters.parquet (doc, id, cluster, keep, reason),
  work/dedupe/manifest.json and work/metrics/dedupe.json. It dedupes on *token* n-grams: it runs
  after tokenize, so the documents are already compact integer arrays (Arrow list offsets + values
  go into numpy without a copy), integers vectorise well, and no second pass over the text is
  needed. Whitespace-only tokens (line breaks, indentation) are dropped before hashing
  (`dedupe.ignore_whitespace_tokens`, read from the shards' tokenizer.json), so a re-wrapped copy
  still matches; exact duplicates are then identical token sequences up to those tokens. Copies
  that differ in case tokenize differently and are caught as near duplicates instead.
  Shards are streamed batch by batch; the per-document state (digests, signatures, band keys,
  token/byte counts) is spilled to a temp directory beside the output and resolved at the end,
  so peak memory stays ~flat as the corpus grows (results/bench/data_memory.md).
- Standalone, `python -m stages.dedupe --input DOCS.parquet --output OUT.parquet`: any Parquet
  file with columns id and text -> one row per input document (id, cluster, keep). It dedupes on
  normalised *words* (lowercase, whitespace-split, word 5-grams by default): there is no tokenizer
  outside the pipeline, and word shingles are the usual near-duplicate definition for text.

In both, the cluster id is the index of the lowest document in the cluster (the `doc` value in the
pipeline, the row number standalone) and that document is the one kept. `reason` says why a
row was dropped: `exact` (identical to an earlier document), `near` (estimated Jaccard >= threshold
to a cluster member); survivors say `unique`.
"""

from __future__ import annotations

import ctypes
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_study.cli import Timer, n_workers, progress, setup_logging
from moe_study.config.schema import DedupeConfig, Params
from moe_study.data.artefacts import ShardError, iter_shards, load_manifest
from moe_study.data.minhash import REASONS, DedupeIndex, DedupeResult, text_to_ints
from moe_study.data.synthetic import planted_token_pairs
from moe_study.hashing import sha256_file
from moe_study.io import WORK, atomic_path, write_json
from moe_study.provenance import provenance

TOKENS_DIR = WORK / "tokens"
OUT_DIR = WORK / "dedupe"
METRICS = WORK / "metrics" / "dedupe.json"
TOKEN_COLUMNS = ["doc", "id", "source", "n_bytes", "tokens"]
BATCH_ROWS = 4096
TRIM_EVERY = 8  # batches between release_memory() calls while streaming

CLUSTER_SCHEMA = pa.schema(
    [("doc", pa.int64()), ("id", pa.string()), ("cluster", pa.int64()), ("keep", pa.bool_()),
     ("reason", pa.string())]
)
STANDALONE_SCHEMA = pa.schema([("id", pa.string()), ("cluster", pa.int64()), ("keep", pa.bool_())])


class DedupeError(ValueError):
    """Bad input to the dedupe stage; the message names the file or field."""


def list_arrays(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets from 0) of an Arrow list column; a null list counts as empty."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(col).to_numpy()
    return values, offsets


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only; probe it here
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def release_memory() -> None:
    """Give freed heap memory back to the OS: Arrow's pool, then glibc's arenas (malloc_trim).

    Why: while streaming, live memory is flat (a window of batches), but with worker threads
    glibc keeps per-thread arenas and mimalloc keeps freed pages, so RSS crept up by ~100 B per
    document streamed. Trimming every few batches keeps the peak at the working set. A no-op
    where glibc is absent.
    """
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=max(1, table.num_rows))


# ------------------------------------------------------------------------------------- pipeline
def check_token_shards(tokens_dir: Path) -> dict[str, Any]:
    """The token manifest, after checking that shards exist and carry the columns dedupe reads."""
    m = load_manifest(tokens_dir)
    if not m["shards"]:
        raise DedupeError(f"{tokens_dir / 'manifest.json'}: no token shards (empty corpus?)")
    first = tokens_dir / m["shards"][0]["file"]
    try:
        names = pq.read_schema(first).names
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{first}: unreadable Parquet ({err})") from None
    missing = [c for c in TOKEN_COLUMNS if c not in names]
    if missing:
        raise DedupeError(f"{first}: token shard lacks column(s) {missing} (has {names})")
    return m


def whitespace_tokens(tokens_dir: Path, manifest: dict[str, Any]) -> np.ndarray:
    """bool[vocab]: token ids that decode to whitespace only (from the tokenizer.json of the shards).

    Byte-level BPE makes a line break plus indentation its own token(s), so the same text wrapped
    differently shares few token n-grams; dropping these ids before hashing restores the match
    (the token counterpart of the whitespace collapsing of text mode).
    """
    path = tokens_dir / str(manifest.get("tokenizer_file", "tokenizer.json"))
    if not path.exists():
        raise DedupeError(f"{path}: missing; dedupe.ignore_whitespace_tokens needs the tokenizer of the "
                          "token shards (or set it to false)")
    want = manifest.get("tokenizer_sha256")
    if want and sha256_file(path) != want:
        raise DedupeError(f"{path}: sha256 differs from {tokens_dir / 'manifest.json'} (stale or corrupt)")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad files
        raise DedupeError(f"{path}: not a valid tokenizer.json ({err})") from None
    size = max(int(manifest.get("vocab_size", 0)), tok.get_vocab_size(with_added_tokens=True))
    table = np.zeros(size, dtype=bool)
    for i in range(size):
        text = tok.decode([i], skip_special_tokens=True)
        table[i] = bool(text) and text.isspace()
    return table


def _drop_ids(values: np.ndarray, offsets: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove the values whose id is marked in `drop`, keeping document boundaries."""
    if len(values) and int(values.max()) >= len(drop):
        raise DedupeError(f"token id {int(values.max())} is outside the tokenizer's vocabulary ({len(drop)})")
    kept = ~drop[values]
    before = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(kept, out=before[1:])
    return values[kept], before[offsets]


class SourceCodes:
    """Per-batch source strings -> small integer codes, so the stage never holds the source column.

    Codes are given in order of first appearance; `names[code]` is the source.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._code: dict[str, int] = {}

    def encode(self, col: pa.Array, where: Path) -> np.ndarray:
        if col.null_count:
            raise DedupeError(f"{where}: column source has {col.null_count} null value(s)")
        enc = pc.dictionary_encode(col.cast(pa.string()))
        local = np.array([self._code.setdefault(name, len(self._code)) for name in enc.dictionary.to_pylist()],
                         dtype=np.int32)
        self.names = list(self._code)
        return local[enc.indices.to_numpy()] if len(local) else np.zeros(0, dtype=np.int32)


class ColumnSpill:
    """Fixed-width per-document columns appended batch by batch to files in a private temp dir.

    Why files and not lists of arrays: thousands of small arrays kept alive between the large
    transient buffers of each batch fragment the heap, and RSS creeps up with the corpus even
    though the arrays themselves are small. The columns are read back whole once streaming is
    done. The directory is removed by `close()` (context manager), error or not.
    """

    def __init__(self, dtypes: dict[str, Any], spill_dir: Path | None = None) -> None:
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="dedupe-columns-", dir=spill_dir)
        self.dtypes = {k: np.dtype(v) for k, v in dtypes.items()}
        self._paths = {k: Path(self._tmp.name) / f"{k}.bin" for k in dtypes}
        self._stack = ExitStack()
        self._files = {k: self._stack.enter_context(open(p, "wb"))  # noqa: SIM115 - closed by close()
                       for k, p in self._paths.items()}

    def append(self, name: str, values: np.ndarray) -> None:
        a = np.ascontiguousarray(values, dtype=self.dtypes[name])
        self._files[name].write(memoryview(a).cast("B"))

    def read(self, name: str) -> np.ndarray:
        self._files[name].flush()
        return np.fromfile(self._paths[name], dtype=self.dtypes[name])

    def close(self) -> None:
        self._stack.close()
        self._tmp.cleanup()

    def __enter__(self) -> ColumnSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ids(tokens_dir: Path, n: int, n_bytes: int) -> pa.Array:
    """The id column of the token shards as one contiguous string array (a second, id-only pass).

    Why a second pass: ids are the widest per-document field (tens of bytes), and the output table
    needs them only at the very end, after the index has been freed. Each batch is copied into
    offsets/data buffers sized by the first pass (`n` ids, `n_bytes` UTF-8 bytes), so the ids are
    never held twice (as `pa.concat_arrays` of the batches would).
    """
    if n_bytes >= 1 << 31:
        raise DedupeError(f"{tokens_dir}: ids total {n_bytes} bytes, more than a string column holds (2 GiB)")
    offsets = np.zeros(n + 1, dtype=np.int32)
    data = np.empty(n_bytes, dtype=np.uint8)
    row = pos = 0
    for b in iter_shards(tokens_dir, columns=["id"], batch_rows=BATCH_ROWS):
        col = b.column("id").cast(pa.string())
        k = len(col)
        if col.null_count or row + k > n:
            raise DedupeError(f"{tokens_dir}: the token shards changed while dedupe ran (ids differ)")
        if k == 0:
            continue
        off = np.frombuffer(col.buffers()[1], dtype=np.int32, count=k + 1, offset=4 * col.offset)
        lo, hi = int(off[0]), int(off[-1])
        if pos + hi - lo > n_bytes:
            raise DedupeError(f"{tokens_dir}: the token shards changed while dedupe ran (ids differ)")
        offsets[row + 1 : row + k + 1] = off[1:] - lo + pos
        if hi > lo:
            data[pos : pos + hi - lo] = np.frombuffer(col.buffers()[2], dtype=np.uint8, count=hi - lo, offset=lo)
        row, pos = row + k, pos + hi - lo
    if row != n or pos != n_bytes:
        raise DedupeError(f"{tokens_dir}: the token shards changed while dedupe ran ({row} ids, {n} docs)")
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def dedupe_token_shards(
    tokens_dir: Path, cfg: DedupeConfig, threads: int, spill_dir: Path | None = None
) -> tuple[pa.Table, DedupeResult, dict[str, Any]]:
    """Stream the token shards through the index; (clusters table, result, per-doc columns).

    Nothing per document is held in RAM while streaming: the index and the fixed-width columns
    (doc, tokens, bytes, source code) spill under `spill_dir` (system temp if None), and the ids
    are read back at the end (`read_ids`). What remains is O(docs) only in the final arrays.
    """
    m = check_token_shards(tokens_dir)
    drop = whitespace_tokens(tokens_dir, m) if cfg.ignore_whitespace_tokens else None
    n_batches = sum(-(-int(s["rows"]) // BATCH_ROWS) for s in m["shards"])
    sources = SourceCodes()
    last = -1
    id_bytes = 0
    n_seen = [0]
    spill = ColumnSpill({"doc": np.int64, "tokens": np.int64, "n_bytes": np.int64, "source_code": np.int32},
                        spill_dir)

    def collect(batch: pa.RecordBatch) -> None:  # calling thread, in order
        nonlocal last, id_bytes
        doc = batch.column("doc").to_numpy(zero_copy_only=False).astype(np.int64)
        if len(doc) and (doc[0] <= last or (np.diff(doc) <= 0).any()):
            raise DedupeError(f"{tokens_dir}: column doc is not strictly increasing near doc {int(doc[0])}")
        if len(doc):
            last = int(doc[-1])
        ids = batch.column("id")
        if ids.null_count:
            raise DedupeError(f"{tokens_dir}: column id has {ids.null_count} null value(s) near doc {int(doc[0])}")
        id_bytes += int(pc.sum(pc.binary_length(ids.cast(pa.string()))).as_py() or 0)
        spill.append("doc", doc)
        spill.append("source_code", sources.encode(batch.column("source"), tokens_dir))
        spill.append("n_bytes", pc.fill_null(batch.column("n_bytes"), 0).to_numpy())
        spill.append("tokens", pc.fill_null(pc.list_value_length(batch.column("tokens")), 0).to_numpy())
        n_seen[0] += 1
        if n_seen[0] % TRIM_EVERY == 0:
            release_memory()

    def prepare(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:  # worker thread
        values, offsets = list_arrays(batch.column("tokens"))
        return (values, offsets) if drop is None else _drop_ids(values, offsets, drop)

    batches = iter_shards(tokens_dir, columns=TOKEN_COLUMNS, batch_rows=BATCH_ROWS)
    with spill, DedupeIndex(cfg, threads, spill_dir) as idx:
        idx.add_all(progress(batches, total=n_batches, desc="dedupe", unit="batch"), prepare, collect)
        if idx.n == 0:
            raise DedupeError(f"{tokens_dir}: the token shards hold no documents")
        release_memory()
        res = idx.finish()
        cols = {k: spill.read(k) for k in spill.dtypes}
    release_memory()
    cols["source_names"] = sources.names
    doc_all = cols["doc"]
    table = pa.table(
        {
            "doc": pa.array(doc_all, pa.int64()),
            "id": read_ids(tokens_dir, len(doc_all), id_bytes),
            "cluster": pa.array(doc_all[res.cluster], pa.int64()),
            "keep": pa.array(res.keep),
            "reason": pc.take(pa.array(REASONS, pa.string()), pa.array(res.reason)),
        },
        schema=CLUSTER_SCHEMA,
    )
    return table, res, cols


def removal_metrics(res: DedupeResult, cols: dict[str, Any]) -> dict[str, Any]:
    """Docs/tokens/bytes removed, overall and per source, split into exact and near."""
    tokens, nb = cols["tokens"], cols["n_bytes"]
    names, src = cols["source_names"], cols["source_code"]
    exact, near = res.reason == 1, res.reason == 2

    def block(mask: np.ndarray) -> dict[str, Any]:
        rem = mask & ~res.keep
        out = {
            "docs": int(mask.sum()),
            "tokens": int(tokens[mask].sum()),
            "bytes": int(nb[mask].sum()),
            "removed_docs": int(rem.sum()),
            "removed_tokens": int(tokens[rem].sum()),
            "removed_bytes": int(nb[rem].sum()),
            "removed_exact_docs": int((mask & exact).sum()),
            "removed_exact_tokens": int(tokens[mask & exact].sum()),
            "removed_near_docs": int((mask & near).sum()),
            "removed_near_tokens": int(tokens[mask & near].sum()),
            "empty_docs": int((mask & (tokens == 0)).sum()),
        }
        out["removed_fraction_docs"] = round(out["removed_docs"] / max(1, out["docs"]), 6)
        out["removed_fraction_tokens"] = round(out["removed_tokens"] / max(1, out["tokens"]), 6)
        return out

    everything = block(np.ones(len(tokens), dtype=bool))
    per_source = {names[k]: block(src == k) for k in sorted(range(len(names)), key=lambda k: names[k])}
    return {**everything, "per_source": per_source}


JACCARD_BUCKETS = ((0.7, 0.8), (0.8, 0.9), (0.9, 1.0001))  # [lo, hi): the last one includes J = 1
PLANTED_PAIRS = 1500


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """LSH S-curve: the probability that a pair of Jaccard s shares a band, 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - s**rows) ** bands


def planted_recall(cfg: DedupeConfig, pairs: int = PLANTED_PAIRS, seed: int = 0) -> dict[str, Any]:
    """Recall of this dedupe config on planted token pairs, by exact-Jaccard bucket (0.7-0.8, 0.8-0.9, >= 0.9).

    The pairs (moe_study/data/synthetic.py `planted_token_pairs`: originals and copies with a few tokens
    substituted) go through the same core as the stage (MinHash, LSH banding, estimated-Jaccard check);
    a pair is found when the copy is removed into its original's cluster. Beside it, the S-curve's
    midpoint (1/bands)^(1/rows) and the candidate probability at the threshold: a banding whose
    midpoint sits near the threshold loses pairs just above it (16 x 8: 0.61 at J = 0.7).
    """
    values, offsets, jac = planted_token_pairs(pairs, seed, cfg.ngram)
    with DedupeIndex(cfg, 1) as idx:
        idx.add(values, offsets)
        res = idx.finish()
    orig, copy = np.arange(0, 2 * pairs, 2), np.arange(1, 2 * pairs, 2)
    found = (res.cluster[copy] == res.cluster[orig]) & ~res.keep[copy]
    buckets = {}
    for lo, hi in JACCARD_BUCKETS:
        m = (jac >= lo) & (jac < hi)
        name = f"{lo:.1f}-{min(hi, 1.0):.1f}" if hi <= 1.0 else f">={lo:.1f}"
        buckets[name] = {"pairs": int(m.sum()), "recall": float(found[m].mean()) if m.any() else None,
                         "lsh_candidate_probability_at_lower_edge": round(candidate_probability(lo, cfg.bands,
                                                                                                 cfg.rows), 4)}
    below = jac < cfg.threshold
    return {"bands": cfg.bands, "rows": cfg.rows, "threshold": cfg.threshold,
            "s_curve_midpoint": round((1.0 / cfg.bands) ** (1.0 / cfg.rows), 4),
            "candidate_probability_at_threshold": round(candidate_probability(cfg.threshold, cfg.bands, cfg.rows), 4),
            "pairs": pairs, "seed": seed, "by_jaccard": buckets,
            "removed_below_threshold": float(found[below].mean()) if below.any() else None}


def run_pipeline(
    p: Params,
    tokens_dir: Path = TOKENS_DIR,
    out_dir: Path = OUT_DIR,
    metrics_path: Path = METRICS,
    threads: int = 0,
) -> dict[str, Any]:
    """The stage: clusters.parquet + manifest.json in out_dir (atomically), metrics JSON beside."""
    log = setup_logging("dedupe")
    cfg = p.dedupe
    tokens_dir, out_dir, metrics_path = Path(tokens_dir), Path(out_dir), Path(metrics_path)
    timer = Timer()
    table, res, cols = dedupe_token_shards(tokens_dir, cfg, n_workers(threads), spill_dir=out_dir.parent)
    m_tokens = load_manifest(tokens_dir)
    prov = provenance(
        "dedupe",
        {"tokens": m_tokens["sha256"], "tokens_manifest": sha256_file(tokens_dir / "manifest.json")},
        {"dedupe": cfg.model_dump()},
    )
    metrics = {**removal_metrics(res, cols), "lsh": {k: res.stats[k] for k in (
        "clusters_with_duplicates", "largest_cluster", "lsh_candidate_pairs", "lsh_verified_pairs")},
        "planted_recall": planted_recall(cfg)}
    log.info("recall on planted pairs by Jaccard: %s (S-curve midpoint %.2f, P(candidate | J = %.2f) = %.3f)",
             ", ".join(f"{k} {v['recall']:.3f}" for k, v in metrics["planted_recall"]["by_jaccard"].items()
                       if v["recall"] is not None), metrics["planted_recall"]["s_curve_midpoint"], cfg.threshold,
             metrics["planted_recall"]["candidate_probability_at_threshold"])
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        _write_parquet(table, tmp / "clusters.parquet")
        sha = sha256_file(tmp / "clusters.parquet")
        manifest = {
            "clusters": {"file": "clusters.parquet", "rows": table.num_rows, "sha256": sha},
            "sha256": sha,
            "docs": metrics["docs"],
            "kept_docs": int(res.keep.sum()),
            "kept_tokens": int(cols["tokens"][res.keep].sum()),
            "removed_exact_docs": metrics["removed_exact_docs"],
            "removed_near_docs": metrics["removed_near_docs"],
            "stats": res.stats,
            "provenance": prov,
        }
        write_json(tmp / "manifest.json", manifest)
    write_json(metrics_path, {**metrics, "provenance": prov})
    log.info(
        "%d docs -> %d kept (%d exact, %d near removed; %.2f%% of tokens) in %.1fs (%.0f docs/s)",
        metrics["docs"], manifest["kept_docs"], metrics["removed_exact_docs"], metrics["removed_near_docs"],
        100 * metrics["removed_fraction_tokens"], timer.seconds, metrics["docs"] / max(timer.seconds, 1e-9),
    )
    return manifest


# ------------------------------------------------------------------------------------ standalone
def read_docs_schema(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise DedupeError(f"{path}: file not found")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DedupeError(f"{path}: not a readable Parquet file ({err})") from None
    names = pf.schema_arrow.names
    missing = [c for c in ("id", "text") if c not in names]
    if missing:
        raise DedupeError(f"{path}: missing column(s) {missing} (has {names}); need id and text")
    ttype = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype)):
        raise DedupeError(f"{path}: column text has type {ttype}, expected string")
    if pf.metadata.num_rows == 0:
        raise DedupeError(f"{path}: no documents (0 rows)")
    return pf


def dedupe_file(
    input_path: Path, output_path: Path, cfg: DedupeConfig, threads: int = 0, batch_rows: int = BATCH_ROWS
) -> dict[str, Any]:
    """Standalone text dedupe of a Parquet file (id, text) -> output Parquet (id, cluster, keep)."""
    input_path, output_path = Path(input_path), Path(output_path)
    pf = read_docs_schema(input_path)
    ids: list[pa.Array] = []
    nulls = 0

    def collect(batch: pa.RecordBatch) -> None:  # calling thread, in order
        nonlocal nulls
        id_col = batch.column("id")
        if id_col.null_count:
            raise DedupeError(f"{input_path}: column id has {id_col.null_count} null value(s)")
        nulls += batch.column("text").null_count
        ids.append(id_col.cast(pa.string()))

    with DedupeIndex(cfg, n_workers(threads), spill_dir=output_path.parent) as idx:
        try:
            batches = pf.iter_batches(batch_size=batch_rows, columns=["id", "text"])
            total = -(-pf.metadata.num_rows // batch_rows)
            idx.add_all(progress(batches, total=total, desc="dedupe", unit="batch"),
                        lambda b: text_to_ints(b.column("text").to_pylist()), collect)
        except (pa.ArrowInvalid, OSError) as err:
            raise DedupeError(f"{input_path}: unreadable Parquet ({err})") from None
        res = idx.finish()
    table = pa.table(
        {"id": pa.concat_arrays(ids), "cluster": pa.array(res.cluster, pa.int64()),
         "keep": pa.array(res.keep)},
        schema=STANDALONE_SCHEMA,
    )
    with atomic_path(output_path) as tmp:
        _write_parquet(table, tmp)
    return {**res.stats, "null_texts": int(nulls)}
