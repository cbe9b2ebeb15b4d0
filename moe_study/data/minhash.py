"""The one dedupe core: exact hashing, MinHash signatures, LSH banding and clustering, in numpy.

Both the pipeline stage (token ids) and the standalone text mode feed this module the same thing:
documents as integer sequences, given as one flat array of values plus doc offsets (the layout of
an Arrow list column, so token shards arrive here without a copy).

- Text mode maps each document to a sequence of *word hashes*: lowercase, split on whitespace,
  each word -> uint64 by a polynomial hash over its UTF-8 bytes, computed for a whole batch at once
  with one segmented sum (`text_to_ints`). Why words and why hashed: word n-grams are the usual MinHash
  shingles for near-duplicate text (robust to re-wrapping, fast, what datasketch users do);
  hashing makes them fixed-width integers so that the rest of the code is the token code, and
  the segmented-sum hash needs no Python loop per word (a 64-bit word-hash collision between two of
  a million distinct words has probability ~1e-8).
- Shingles: each n-gram window is folded into one uint64 (multiply-add + splitmix64 finaliser
  per position, over the whole batch: a loop over the n positions, never over shingles). A
  document shorter than `ngram` is *one* shingle of all its values, so short documents still
  get a signature and two identical short documents still match; an empty document has no
  shingles and never enters LSH (exact hashing groups empty documents together).
- MinHash: for permutation k, h_k(s) = a_k * s + b_k mod 2^64 with a_k odd (a bijection of the
  already well-mixed shingle hash), minimum per document with `np.minimum.reduceat`, top 32 bits
  kept (uint32 signatures: half the memory, 2^-32 per-slot collision). Shingles are processed in
  chunks of at most `CHUNK_SHINGLES` values. Batches are sketched in worker threads (numpy
  releases the GIL) and committed in document order, so results do not depend on the thread count.
- LSH: `bands` x `rows` slots -> one uint64 key per band; documents with equal keys in a band
  are candidates. Grouping is by sort; inside a bucket each document is paired with the next
  `MAX_BUCKET_PAIRS` bucket members (all pairs for buckets up to that size), bounding the work on
  degenerate buckets. Candidates are verified by the estimated Jaccard over *all* num_perm slots
  (>= threshold), then clustered by connected components (vectorised union-find with pointer
  jumping).
- Exact: a 128-bit BLAKE2b of each document's value sequence; later copies join the first one.
- Survivor: the lowest document index in each cluster; the cluster id is that index.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from moe_study.config.schema import DedupeConfig
from moe_study.hashing import mix64

U64 = np.uint64
MASK64 = (1 << 64) - 1
CHUNK_SHINGLES = 1 << 19  # shingles per MinHash chunk: 4 MiB of uint64 per thread buffer
MAX_BUCKET_PAIRS = 32  # partners per document inside one LSH bucket
T = TypeVar("T")
REASONS = ("unique", "exact", "near")  # reason codes 0, 1, 2
EMPTY_SIG = np.uint32(0xFFFFFFFF)


# ----------------------------------------------------------------------------------------- mixing


def _seed_stream(seed: int, tag: int, n: int) -> np.ndarray:
    """n deterministic uint64 constants for (seed, purpose tag)."""
    rng = np.random.Generator(np.random.PCG64([seed & MASK64, tag]))
    return rng.integers(0, 1 << 64, size=n, dtype=U64, endpoint=False)


# ------------------------------------------------------------------------------------- text -> ints
_P = 0x100000001B3  # FNV prime (odd)
_WRAP = 1 << 12  # byte positions inside a word are taken mod this: a fixed 32 KiB power table
_PW = np.cumprod(np.concatenate([[1], np.full(_WRAP - 1, _P)]).astype(U64), dtype=U64)


def normalise_text(text: str) -> str:
    """Lowercase and collapse every run of whitespace to one space (what 'exact' ignores in text mode)."""
    return " ".join(text.lower().split())


def text_to_ints(texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised words of each text as uint64 word hashes: (values, offsets[len(texts)+1]).

    hash(word) = mix64(len ^ sum_i byte_i * P^(i mod 4096) mod 2^64), for every word of the batch
    at once: one gather, one multiply and one `np.add.reduceat` over the bytes inside words.
    Memory is linear in the batch's bytes whatever the word or document lengths. None counts as
    an empty text.
    """
    norm = [normalise_text(t) if t else "" for t in texts]
    d = len(norm)
    offsets = np.zeros(d + 1, dtype=np.int64)
    buf = np.frombuffer("\n".join(norm).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    inside = np.flatnonzero((buf != 32) & (buf != 10))  # byte positions inside words
    if len(inside) == 0:
        return np.zeros(0, dtype=U64), offsets
    first = np.ones(len(inside), dtype=bool)
    first[1:] = inside[1:] != inside[:-1] + 1
    seg = np.flatnonzero(first)  # where each word starts in `inside`
    wlen = np.diff(np.append(seg, len(inside)))
    pos = np.arange(len(inside), dtype=np.int64) - np.repeat(seg, wlen)
    h = np.add.reduceat(buf[inside].astype(U64) * _PW[pos & (_WRAP - 1)], seg)
    values = mix64(h ^ wlen.astype(U64))
    doc_of_word = np.cumsum(buf == 10)[inside[seg]]
    np.cumsum(np.bincount(doc_of_word, minlength=d), out=offsets[1:])
    return values, offsets


# ----------------------------------------------------------------------------------------- shingles
def shingle_hashes(
    values: np.ndarray, offsets: np.ndarray, ngram: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint64 hash of every n-gram window of every document: (hashes, shingle offsets).

    A document with 0 < len < ngram gives one shingle (all its values); an empty one gives none.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    nsh = np.where(lengths == 0, 0, np.maximum(lengths - ngram + 1, 1))
    sh_off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(nsh, out=sh_off[1:])
    total = int(sh_off[-1])
    if total == 0:
        return np.zeros(0, dtype=U64), sh_off
    k = _seed_stream(seed, 1, ngram + 1)
    x = mix64(np.asarray(values).astype(U64, copy=False) + k[0])
    starts = np.repeat(offsets[:-1] - sh_off[:-1], nsh) + np.arange(total, dtype=np.int64)
    h = x[starts]
    short = bool((lengths[lengths > 0] < ngram).any())
    if short:
        ends = np.repeat(offsets[1:], nsh)
    last = len(x) - 1
    for j in range(1, ngram):
        pos = starts + j
        if short:
            valid = pos < ends
            np.minimum(pos, last, out=pos)
        step = mix64(h * (k[j] | U64(1)) + x[pos])
        h = np.where(valid, step, h) if short else step
    return h, sh_off


# ------------------------------------------------------------------------------------------ MinHash
class MinHasher:
    """num_perm seeded affine hashes of shingle hashes; signatures for a batch of documents.

    Stateless after construction, so worker threads share one instance.
    """

    def __init__(self, cfg: DedupeConfig) -> None:
        self.cfg = cfg
        self.a = _seed_stream(cfg.seed, 2, cfg.num_perm) | U64(1)
        self.b = _seed_stream(cfg.seed, 3, cfg.num_perm)

    def _block(self, sh: np.ndarray, starts: np.ndarray) -> np.ndarray:
        out = np.empty((len(starts), self.cfg.num_perm), dtype=np.uint32)
        tmp = np.empty_like(sh)
        for p in range(self.cfg.num_perm):
            np.multiply(sh, self.a[p], out=tmp)
            np.add(tmp, self.b[p], out=tmp)
            out[:, p] = (np.minimum.reduceat(tmp, starts) >> U64(32)).astype(np.uint32)
        return out

    def signatures(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """uint32 [docs, num_perm]; an empty document's row is all 0xFFFFFFFF."""
        sh, sh_off = shingle_hashes(values, offsets, self.cfg.ngram, self.cfg.seed)
        d = len(sh_off) - 1
        sig = np.full((d, self.cfg.num_perm), EMPTY_SIG, dtype=np.uint32)
        nonempty = np.flatnonzero(np.diff(sh_off) > 0)
        doc_ends = sh_off[nonempty + 1]
        i = 0
        while i < len(nonempty):
            # a chunk of whole documents with at most CHUNK_SHINGLES shingles (at least one doc);
            # consecutive non-empty docs, so the reduceat segments are exactly their shingles
            base = sh_off[nonempty[i]]
            j = max(int(np.searchsorted(doc_ends, base + CHUNK_SHINGLES, side="right")), i + 1)
            docs = nonempty[i:j]
            lo, hi = int(sh_off[docs[0]]), int(sh_off[docs[-1] + 1])
            sig[docs] = self._block(sh[lo:hi], sh_off[docs] - lo)
            i = j
        return sig


def band_keys(sig: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """uint64 [docs, bands]: each band's `rows` signature slots folded into one key."""
    k = _seed_stream(seed, 4, bands * rows + bands)
    keys = np.empty((sig.shape[0], bands), dtype=U64)
    for b in range(bands):
        h = np.full(sig.shape[0], k[bands * rows + b], dtype=U64)
        for r in range(rows):
            h = mix64(h * (k[b * rows + r] | U64(1)) + sig[:, b * rows + r].astype(U64))
        keys[:, b] = h
    return keys


def _band_pairs(key: np.ndarray, max_pairs: int) -> list[np.ndarray]:
    """Packed i * n + j (i < j) of the rows sharing this band's key, up to `max_pairs` partners each."""
    n = len(key)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    found: list[np.ndarray] = []
    for off in range(1, min(max_pairs, n - 1) + 1):
        same = np.flatnonzero(sk[:-off] == sk[off:])
        if len(same) == 0:
            break
        i, j = order[same], order[same + off]
        found.append(np.minimum(i, j) * n + np.maximum(i, j))
    return found


def candidate_pairs_by_band(band_keys_iter: Iterable[np.ndarray], n: int,
                            max_pairs: int = MAX_BUCKET_PAIRS) -> np.ndarray:
    """Unique (i, j), i < j, row indices sharing a band key; int64 [pairs, 2], sorted.

    The band key columns come one at a time (each uint64 [n]).

    One band's keys and its sort are all that is held besides the pairs found, so the keys of a
    large corpus can stay on disk (`DedupeIndex` reads one band file at a time).
    """
    found: list[np.ndarray] = []
    for key in band_keys_iter:
        if len(key) != n:
            raise ValueError(f"band key column has {len(key)} rows, expected {n}")
        found += _band_pairs(key, max_pairs)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    packed = np.unique(np.concatenate(found))
    return np.stack([packed // n, packed % n], axis=1)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), chunk):
        p = pairs[s : s + chunk]
        out[s : s + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected components as the lowest index in each: labels[int64 n].

    Vectorised union-find: hook the larger root under the smaller, then pointer-jump to full
    compression; repeat until every edge joins equal roots. parent[x] <= x holds throughout, so
    the root of a component is its minimum.
    """
    parent = np.arange(n, dtype=np.int64)
    if len(edges) == 0:
        return parent
    i, j = edges[:, 0], edges[:, 1]
    while True:
        pi, pj = parent[i], parent[j]
        diff = pi != pj
        if not diff.any():
            return parent
        pi, pj = pi[diff], pj[diff]
        lo = np.minimum(pi, pj)
        np.minimum.at(parent, pi, lo)
        np.minimum.at(parent, pj, lo)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


# ----------------------------------------------------------------------------------- streaming index
@dataclass
class DedupeResult:
    cluster: np.ndarray  # int64: lowest document index of the cluster
    keep: np.ndarray  # bool: this document is its cluster's survivor
    reason: np.ndarray  # uint8 index into REASONS
    stats: dict = field(default_factory=dict)

    def reasons(self) -> list[str]:
        return [REASONS[r] for r in self.reason]


def exact_digest(values: np.ndarray) -> bytes:
    """128-bit digest of a document's values as uint64 (so it does not depend on the token dtype)."""
    v = np.ascontiguousarray(values, dtype=U64)
    return hashlib.blake2b(v.tobytes(), digest_size=16).digest()


def first_occurrence(digests: np.ndarray) -> np.ndarray:
    """int64 [n]: for each row of uint64 [n, 2] digests, the lowest row index with the same digest.

    A sort instead of a hash table: the digests can live on disk while the corpus streams, and at
    the end one lexsort (24 B per document) groups equal digests; taking the minimum index of each
    group gives exactly what a first-seen dict gives.
    """
    n = len(digests)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    hi, lo = digests[order, 0], digests[order, 1]
    start = np.ones(n, dtype=bool)
    start[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    del hi, lo
    starts = np.flatnonzero(start)
    first = np.minimum.reduceat(order, starts)
    rep = np.empty(n, dtype=np.int64)
    rep[order] = np.repeat(first, np.diff(np.append(starts, n)))
    return rep


@dataclass
class BatchSketch:
    """What one batch contributes: lengths, exact digests, signatures and band keys of its non-empty docs."""

    lengths: np.ndarray
    digests: np.ndarray | None  # uint64 [docs, 2]
    sig: np.ndarray | None  # rows = the batch's docs with lengths > 0, in order
    keys: np.ndarray | None  # uint64 [rows of sig, bands]


def _select(values: np.ndarray, offsets: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values and offsets of a subset of the documents of a batch."""
    starts, lens = offsets[docs], offsets[docs + 1] - offsets[docs]
    new_off = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    idx = np.repeat(starts - new_off[:-1], lens) + np.arange(int(new_off[-1]), dtype=np.int64)
    return values[idx], new_off


def _append(f: BinaryIO, a: np.ndarray) -> None:
    """Write an array's bytes to a spill file without a temporary copy when it is contiguous.

    Why not `tobytes()`: a fresh multi-MB bytes object per batch is exactly the kind of transient
    allocation that fragments the heap around the small arrays kept alive, and RSS creeps.
    """
    f.write(memoryview(np.ascontiguousarray(a)).cast("B"))


class DedupeIndex:
    """Accumulates documents batch by batch; `finish()` clusters them.

    Memory stays flat as the corpus grows: everything that is per document and wide goes to
    files in a private temp directory (under `spill_dir`, else the system temp), appended in
    document order -- a non-empty flag (1 B) and the exact digest (16 B) of every document, the
    uint32 signature row (4 * num_perm B) and the LSH band keys (one file per band, 8 B each) of
    every non-empty one. RAM holds nothing per document while streaming. `finish()` then works in pieces: exact
    duplicates by one sort of the digests (`first_occurrence`), candidate pairs one band file at a
    time, verification reading signature rows through short-lived memory maps, and components on
    the LSH documents only (exact copies join their first occurrence's cluster).

    Which documents enter LSH is decided at the end (non-empty first occurrences), so a batch no
    longer needs the earlier batches' digests: the result is the same as deciding while streaming,
    at the cost of writing signatures for exact copies too (disk, not RAM).

    Parallelism is across batches (`add_all`): `sketch` (shingles, MinHash, band keys, digests) is
    pure and runs in worker threads (numpy releases the GIL); `commit` appends to the files in
    document order on the calling thread, so results do not depend on the number of threads.

    Use as a context manager (or call `close()`): the temp directory is removed on exit, error or
    not, and by `finish()`.
    """

    VERIFY_CHUNK = 1 << 13  # candidate pairs verified per memory map: bounds the signature pages resident

    def __init__(self, cfg: DedupeConfig, threads: int = 1, spill_dir: Path | str | None = None) -> None:
        self.cfg = cfg
        self.threads = max(1, threads)
        self.hasher = MinHasher(cfg) if cfg.near else None
        self.n = 0  # documents committed
        self.m = 0  # signature rows written (non-empty documents)
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="dedupe-spill-", dir=spill_dir)
        d = Path(self._tmp.name)
        self._nonempty_path, self._digest_path = d / "nonempty.b", d / "digests.u64"
        self._sig_path = d / "signatures.u32"
        self._band_paths = [d / f"band-{b:03d}.u64" for b in range(cfg.bands)]
        self._stack = ExitStack()
        self._files = [self._stack.enter_context(open(x, "wb"))  # noqa: SIM115 - closed by close()
                       for x in (self._nonempty_path, self._digest_path, self._sig_path, *self._band_paths)]

    # --------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the spill files and delete the temp directory (idempotent)."""
        self._stack.close()
        self._tmp.cleanup()

    def __enter__(self) -> DedupeIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- streaming
    def sketch(self, values: np.ndarray, offsets: np.ndarray) -> BatchSketch:
        """One batch: values (any integer dtype; widened to uint64) and doc offsets[docs+1]."""
        values = np.asarray(values).astype(U64, copy=False)
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        digests = None
        if self.cfg.exact:
            raw = b"".join(exact_digest(values[offsets[k] : offsets[k + 1]]) for k in range(len(lengths)))
            digests = np.frombuffer(raw, dtype=U64).reshape(-1, 2)
        sig = keys = None
        if self.hasher is not None:
            nonempty = np.flatnonzero(lengths > 0)
            if len(nonempty) < len(lengths):
                values, offsets = _select(values, offsets, nonempty)
            sig = self.hasher.signatures(values, offsets)
            keys = band_keys(sig, self.cfg.bands, self.cfg.rows, self.cfg.seed)
        return BatchSketch(lengths, digests, sig, keys)

    def commit(self, sk: BatchSketch) -> None:
        """Append a sketched batch as the next documents (call in document order)."""
        nonempty_f, digest_f, sig_f, *band_f = self._files
        _append(nonempty_f, sk.lengths > 0)
        if sk.digests is not None:
            _append(digest_f, sk.digests.astype(U64, copy=False))
        if sk.sig is not None and len(sk.sig):
            _append(sig_f, sk.sig.astype(np.uint32, copy=False))
            for b, f in enumerate(band_f):
                _append(f, sk.keys[:, b])
            self.m += len(sk.sig)
        self.n += len(sk.lengths)

    def add(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.commit(self.sketch(values, offsets))

    def add_all(
        self,
        batches: Iterable[T],
        prepare: Callable[[T], tuple[np.ndarray, np.ndarray]],
        on_batch: Callable[[T], None] | None = None,
    ) -> None:
        """Sketch up to 2 * threads batches at once, commit them in order.

        `prepare` turns a batch into (values, offsets) in the worker; `on_batch` runs on the
        calling thread, in order, before the batch is submitted (collect ids, validate).
        """
        if self.threads == 1:
            for b in batches:
                if on_batch is not None:
                    on_batch(b)
                self.add(*prepare(b))
            return
        window: deque[Future[BatchSketch]] = deque()
        with ThreadPoolExecutor(self.threads) as pool:
            for b in batches:
                if on_batch is not None:
                    on_batch(b)
                window.append(pool.submit(lambda b=b: self.sketch(*prepare(b))))
                if len(window) >= 2 * self.threads:
                    self.commit(window.popleft().result())
            while window:
                self.commit(window.popleft().result())

    # --------------------------------------------------------------------------- clustering
    def _verify(self, pairs: np.ndarray) -> np.ndarray:
        """Estimated Jaccard of signature-file rows (i, j), through one short-lived memory map per chunk.

        Unmapping after each chunk keeps at most the pages of one chunk's rows resident, so the
        signatures never count fully against RSS however many documents there are.
        """
        out = np.empty(len(pairs), dtype=np.float64)
        step = self.VERIFY_CHUNK
        for s in range(0, len(pairs), step):
            sig = np.memmap(self._sig_path, dtype=np.uint32, mode="r", shape=(self.m, self.cfg.num_perm))
            out[s : s + step] = estimated_jaccard(sig, pairs[s : s + step], step)
            del sig
        return out

    def _near_labels(self, rows: np.ndarray, file_rows: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Lowest LSH document (as an index into `rows`) of each near-duplicate component of `rows`.

        `rows` are the documents that enter LSH (increasing), `file_rows` their rows in the spill
        files. Returns (labels into rows, candidate pairs, verified pairs).
        """
        keys = (np.fromfile(p, dtype=U64)[file_rows] for p in self._band_paths)
        pairs = candidate_pairs_by_band(keys, len(rows))
        ok = pairs[self._verify(file_rows[pairs]) >= self.cfg.threshold]
        return components(len(rows), ok), len(pairs), len(ok)

    def finish(self) -> DedupeResult:
        """Cluster everything committed; removes the spill files (the index is done afterwards).

        Labels are the lowest document of each connected component of the graph whose edges join
        every document to the first occurrence of its exact digest and LSH documents whose
        estimated Jaccard passes the threshold. Exact edges form stars around first occurrences,
        and only first occurrences enter LSH, so the components are found on the LSH documents
        alone and each document takes the label of its first occurrence.
        """
        for f in self._files:
            f.flush()
        try:
            n = self.n
            ar = np.arange(n, dtype=np.int64)
            nonempty = np.fromfile(self._nonempty_path, dtype=bool)
            if self.cfg.exact and n:
                rep = first_occurrence(np.fromfile(self._digest_path, dtype=U64).reshape(-1, 2))
            else:
                rep = ar.copy()
            base = ar.copy()  # label of each first occurrence
            n_candidates = n_verified = 0
            if self.hasher is not None and self.m:
                lsh = nonempty & (rep == ar)  # non-empty first occurrences
                rows = np.flatnonzero(lsh)
                file_rows = np.flatnonzero(lsh[nonempty])  # signature-file row of each LSH doc
                del lsh
                if len(rows):
                    comp, n_candidates, n_verified = self._near_labels(rows, file_rows)
                    base[rows] = rows[comp]
            labels = base[rep]
            del base
        finally:
            self.close()
        keep = labels == ar
        reason = np.zeros(n, dtype=np.uint8)
        reason[~keep] = 2
        reason[~keep & (rep != ar)] = 1
        del rep, ar
        sizes = np.bincount(labels, minlength=n) if n else np.zeros(0, dtype=np.int64)
        stats = {
            "docs": int(n),
            "kept": int(keep.sum()),
            "removed_exact": int((reason == 1).sum()),
            "removed_near": int((reason == 2).sum()),
            "empty_docs": int((~nonempty).sum()),
            "clusters_with_duplicates": int((sizes > 1).sum()),
            "largest_cluster": int(sizes.max()) if n else 0,
            "lsh_candidate_pairs": int(n_candidates),
            "lsh_verified_pairs": int(n_verified),
        }
        return DedupeResult(cluster=labels, keep=keep, reason=reason, stats=stats)


def dedupe_texts(
    texts: Sequence[str | None], cfg: DedupeConfig, threads: int = 1, batch_docs: int = 2048
) -> DedupeResult:
    """Text mode in memory: normalised word n-grams (see `text_to_ints`)."""
    slices = (texts[s : s + batch_docs] for s in range(0, len(texts), batch_docs))
    with DedupeIndex(cfg, threads) as idx:
        idx.add_all(slices, text_to_ints)
        return idx.finish()
