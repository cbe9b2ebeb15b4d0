"""The epoch-replay store and the training loader (the paper's data reuse, made reproducible).

Why: at equal unique data U, an MoE run of activation rate r_a reads about 1/r_a epochs of the
same U tokens. Every run must see exactly U unique tokens, every epoch a fresh but reproducible
order, and runs that share a data plan must share the bytes on disk (a 4-epoch run reuses the
2-epoch run's files). So the replayed data is a content-addressed cache, not a per-run output:

  work/store/replay/<key>/                     key = hash(tokens artefact, split, U, data_seed, ...)
      unique.json                              the unique set's metadata (written last: commit marker)
      unique.bin                               its tokens, concatenated in token-shard order
      index.npy                                int64 (n_docs, 3): corpus doc id, start, length; by doc id
      epoch-00000.bin / epoch-00000.json       epoch 0's packed token stream and its sha256
      ...

Unique set. The train documents (split == "train"), sorted by corpus doc id, are put in a seeded
order (data_seed) and taken whole until they reach U tokens; the last one taken is truncated so
that the set holds exactly U tokens (the paper's U is a token count, so it is hit exactly).
Documents with no tokens are skipped and counted. `last_doc` in unique.json records the last doc
taken, its length and how many of its tokens were kept. Because the set is a prefix of one seeded order,
the set for a larger U contains the set for a smaller one.

Epoch stream. Epoch e is a permutation of the unique docs seeded by (data_seed, e), or by
(data_seed, e, order_seed) for a run whose seed varies the data order (`train.vary_data_order`, runs of
seed > 0: the unique set is the same, only the epoch order differs; order_seed 0 is today's order and
today's store key), packed as
`EOS d0 EOS d1 ... EOS dn` (an EOS *before* every doc, so every doc token, the first included, is
a prediction target after a document boundary). Its length is U + n_docs whatever the order, and
it does not depend on seq_len: runs with different context lengths share it too.

Sequences. A run of context seq_len reads sequence i of an epoch as the window
`stream[i*seq_len : i*seq_len + seq_len + 1]` (stride seq_len, +1 token for the shifted target),
so every token but the first of an epoch is a target exactly once; an epoch yields
floor((len - 1) / seq_len) sequences and its last < seq_len tokens are not read (a different doc
tail each epoch, since the order changes). A run needing S_run = ceil(T / seq_len) sequences reads
whole epochs and the first part of the last one; its `replay.json` says how many of each.

Permutations use a counter-based hash (splitmix64 of the index, keyed by the seeds) sorted by
numpy's stable argsort: unlike numpy's Generator streams, it cannot change with a numpy upgrade.

Every file is written to a temp name unique to the writing process and host, then `os.replace`d
into place, so kill -9 leaves only a hidden `.tmp-*` file and two builders of the same epoch write
identical bytes (a builder deletes the temp files of dead writers on its own host before it
starts). Readers verify sha256 before use; a missing or corrupt file is rebuilt from the
token shards and split recorded in the run's replay.json (`ReplayLoader(rebuild=True)`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_study.cli import progress
from moe_study.data.artefacts import iter_shards, load_manifest
from moe_study.hashing import sha256_file, sha256_json, splitmix64, verify_listed
from moe_study.io import read_json, recover_interrupted, temp_sibling, write_json

log = logging.getLogger("moe_study.data.shards")

FORMAT = 2  # bump when the on-disk layout or the order/packing rules change (it is part of the key);
# 2: U counts the EOS separators (one epoch's stream is exactly U tokens)
PERM = "splitmix64-argsort-v1"
KEY_CHARS = 24  # store directory name: a prefix of the full key (the full key is in unique.json)
CHUNK_TOKENS = 1 << 22  # tokens gathered per write when building an epoch (~32 MiB of int64 indices)
_SALT_UNIQUE = 0x756E69717565  # "unique"
_SALT_EPOCH = 0x65706F6368  # "epoch"
_M64 = (1 << 64) - 1


class ReplayError(ValueError):
    """Bad replay inputs or store contents; the message names the file or field."""


# ----------------------------------------------------------------------------------- permutations
def seeded_permutation(n: int, *seeds: int) -> np.ndarray:
    """A permutation of range(n) fixed by the seed words, stable across numpy versions and platforms."""
    h = np.zeros(1, dtype=np.uint64)
    for w in seeds:
        h = splitmix64(h ^ np.array([w & _M64], dtype=np.uint64))
    keys = splitmix64(splitmix64(np.arange(n, dtype=np.uint64) ^ h))
    return np.argsort(keys, kind="stable").astype(np.int64)


# ------------------------------------------------------------------------------------------ inputs
def tokens_meta(tokens_dir: Path | str) -> dict[str, Any]:
    """The fields of the token manifest the replay depends on (the manifest's hash is verified)."""
    m = load_manifest(tokens_dir)
    missing = [k for k in ("eos_id", "dtype", "vocab_size") if k not in m]
    if missing:
        raise ReplayError(f"{Path(tokens_dir) / 'manifest.json'}: missing field(s) {missing}")
    if m["dtype"] not in ("uint16", "uint32"):
        raise ReplayError(f"{Path(tokens_dir) / 'manifest.json'}: dtype {m['dtype']!r} is not uint16/uint32")
    eos = int(m["eos_id"])
    if not 0 <= eos < int(m["vocab_size"]) or eos > np.iinfo(m["dtype"]).max:
        raise ReplayError(f"{Path(tokens_dir) / 'manifest.json'}: eos_id {eos} outside the vocabulary")
    return {"sha256": m["sha256"], "eos_id": eos, "dtype": m["dtype"], "vocab_size": int(m["vocab_size"])}


def train_docs(split_path: Path | str) -> np.ndarray:
    """Sorted corpus doc ids of the train split (split.parquet: doc int64, split in {train, heldout})."""
    split_path = Path(split_path)
    if not split_path.exists():
        raise ReplayError(f"{split_path}: missing (run the split stage first)")
    verify_listed(split_path)
    try:
        t = pq.read_table(split_path, columns=["doc", "split"])
    except (pa.ArrowInvalid, KeyError, OSError) as err:
        raise ReplayError(f"{split_path}: unreadable or lacks columns doc/split ({err})") from None
    if t.column("doc").null_count or t.column("split").null_count:
        raise ReplayError(f"{split_path}: null doc or split values")
    try:
        doc = t.column("doc").cast(pa.int64()).to_numpy()
        split = t.column("split").cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ReplayError(f"{split_path}: doc must be integers and split strings ({err})") from None
    sides = pa.array(["train", "heldout", "validation"])
    bad = pc.unique(pc.filter(split, pc.invert(pc.is_in(split, sides)))).to_pylist()
    if bad:
        raise ReplayError(f"{split_path}: column split holds values other than train/heldout/validation: {bad[:5]}")
    if len(np.unique(doc)) != len(doc):
        raise ReplayError(f"{split_path}: a doc id appears more than once")
    is_train = pc.equal(split, "train").to_numpy(zero_copy_only=False)
    return np.sort(doc[is_train])


def train_docs_sha256(docs: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(docs, dtype="<i8").tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------- unique set
@dataclass(frozen=True)
class UniqueSpec:
    """Everything the unique set (and hence every epoch file) depends on; its hash is the store key."""

    tokens_dir: str
    split_path: str
    tokens_sha256: str  # the token manifest's artefact hash
    train_sha256: str  # sha256 of the sorted train doc ids (int64 LE): the split's content, not its bytes
    unique_tokens: int
    data_seed: int
    eos_id: int
    dtype: str
    order_seed: int = 0  # 0: the epoch order of data_seed alone; else also seeded by this (the run's seed)

    @property
    def key(self) -> str:
        d = asdict(self)
        del d["tokens_dir"], d["split_path"]  # where the inputs live does not change the bytes
        if not d["order_seed"]:
            del d["order_seed"]  # order seed 0 keeps the key (and the store) of before the option
        return sha256_json({"format": FORMAT, "perm": PERM, **d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_inputs(cls, tokens_dir: Path | str, split_path: Path | str, unique_tokens: int,
                    data_seed: int, order_seed: int = 0) -> UniqueSpec:
        if unique_tokens <= 0:
            raise ReplayError(f"budget.unique_tokens={unique_tokens} must be positive")
        tm = tokens_meta(tokens_dir)
        if not Path(split_path).exists():
            raise ReplayError(f"{split_path}: missing (run the split stage first)")
        return cls(tokens_dir=str(tokens_dir), split_path=str(split_path), tokens_sha256=tm["sha256"],
                   train_sha256=train_docs_sha256(train_docs(split_path)), unique_tokens=int(unique_tokens),
                   data_seed=int(data_seed), eos_id=tm["eos_id"], dtype=tm["dtype"], order_seed=int(order_seed))

    def check_inputs(self) -> None:
        """Refuse to rebuild from inputs that differ from the ones this spec was made from."""
        tm = tokens_meta(self.tokens_dir)
        if tm["sha256"] != self.tokens_sha256 or tm["eos_id"] != self.eos_id or tm["dtype"] != self.dtype:
            raise ReplayError(f"{self.tokens_dir}: token shards differ from those the replay was built from "
                              "(re-run the replay stage)")
        if not Path(self.split_path).exists():
            raise ReplayError(f"{self.split_path}: missing, cannot rebuild the replay store")
        if train_docs_sha256(train_docs(self.split_path)) != self.train_sha256:
            raise ReplayError(f"{self.split_path}: differs from the split the replay was built from "
                              "(re-run the replay stage)")


def _publish(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def _save_npy(dest: Path, arr: np.ndarray) -> str:
    tmp = temp_sibling(dest)
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        _publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(dest)


def store_dir(store_root: Path | str, spec: UniqueSpec) -> Path:
    return Path(store_root) / spec.key[:KEY_CHARS]


class UniqueSet:
    """A verified unique set in the store: the tokens memmap and the (doc, start, length) index."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.dir = directory
        self.meta = meta
        self.spec = UniqueSpec(**meta["spec"])
        self.index = np.load(directory / "index.npy", allow_pickle=False)
        self.tokens = np.memmap(directory / "unique.bin", dtype=np.dtype(self.spec.dtype).newbyteorder("<"),
                                mode="r", shape=(int(meta["tokens"]),))

    @property
    def n_docs(self) -> int:
        return int(self.meta["docs"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["tokens"])

    @property
    def stream_tokens(self) -> int:
        """Length of every epoch's packed stream: the tokens plus one EOS per doc."""
        return self.n_tokens + self.n_docs


def _load_unique(directory: Path, spec: UniqueSpec, verify: bool) -> UniqueSet | None:
    """The unique set if it is complete and (when verify) hash-valid, else None."""
    mpath = directory / "unique.json"
    if not mpath.exists():
        return None
    try:
        meta = read_json(mpath)
    except ValueError:
        log.warning("%s: corrupt, rebuilding the unique set", mpath)
        return None
    if meta.get("key") != spec.key:
        raise ReplayError(f"{mpath}: key {meta.get('key')} != expected {spec.key} (store collision?)")
    for name in ("unique.bin", "index.npy"):
        p = directory / name
        if not p.exists() or (verify and sha256_file(p) != meta["sha256"][name]):
            log.warning("%s: missing or corrupt, rebuilding the unique set", p)
            return None
    return UniqueSet(directory, meta)


BATCH_ROWS = 8192  # token-shard rows per record batch while streaming


def _shard_batches(tokens_dir: Path | str, verify: bool, desc: str) -> Iterator[pa.RecordBatch]:
    m = load_manifest(tokens_dir)
    total = sum(math.ceil(int(s["rows"]) / BATCH_ROWS) for s in m["shards"])
    it = iter_shards(tokens_dir, columns=["doc", "tokens"], verify=verify, batch_rows=BATCH_ROWS)
    return progress(it, total=total, desc=desc, unit="batch")


def doc_lengths(tokens_dir: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: (doc ids sorted, their token counts) over every row of the token shards, streamed."""
    docs, lens = [], []
    for b in _shard_batches(tokens_dir, True, "replay: scan doc lengths"):
        docs.append(b.column(0).to_numpy().astype(np.int64))
        lens.append(pc.list_value_length(b.column(1)).to_numpy(zero_copy_only=False).astype(np.int64))
    doc = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    n = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    order = np.argsort(doc, kind="stable")
    doc, n = doc[order], n[order]
    if len(doc) and np.any(doc[1:] == doc[:-1]):
        raise ReplayError(f"{tokens_dir}: a doc id appears in more than one row of the token shards")
    return doc, n


def select_unique(
    spec: UniqueSpec, doc: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Which docs (and how many of their tokens) form the unique set: a seeded prefix reaching U.

    U counts what a pass reads: each doc's tokens plus the EOS before it, so one epoch's packed stream
    is exactly U tokens (the planner then knows the length of a pass: accounting.unique_passes).

    `doc` (sorted) and `length` describe every row of the token shards. Returns (selected doc ids
    sorted, tokens taken of each, stats).
    """
    train = train_docs(spec.split_path)
    pos = np.clip(np.searchsorted(doc, train), 0, max(0, len(doc) - 1))
    found = doc[pos] == train if len(doc) else np.zeros(len(train), bool)
    if not np.all(found):
        missing = train[~found][:5].tolist()
        raise ReplayError(f"{spec.split_path}: {int((~found).sum())} train doc(s) are not in the token "
                          f"shards {spec.tokens_dir} (e.g. {missing}); split and tokens are out of date")
    tlen = length[pos]
    nonempty = tlen > 0
    n_train = len(train)
    train, tlen = train[nonempty], tlen[nonempty]
    available = int(tlen.sum())
    if available < spec.unique_tokens:
        raise ReplayError(
            f"budget.unique_tokens={spec.unique_tokens} exceeds the {available} tokens available in the "
            f"train split ({len(train)} non-empty train docs of {spec.split_path} in {spec.tokens_dir}); "
            "lower budget.unique_tokens or add corpus sources"
        )
    order = seeded_permutation(len(train), _SALT_UNIQUE, spec.data_seed)
    cum = np.cumsum(tlen[order] + 1)  # + its EOS
    k = int(np.searchsorted(cum, spec.unique_tokens, side="left")) + 1  # docs needed to reach U
    chosen = np.sort(order[:k])  # train is sorted by doc id, so this sorts the chosen docs by id
    take = tlen[chosen].copy()
    last = order[k - 1]
    kept = int(tlen[last]) - (int(cum[k - 1]) - spec.unique_tokens)  # >= 0: cum[k - 2] < U
    take[np.searchsorted(chosen, last)] = kept
    stats = {
        "train_docs": n_train,
        "train_docs_empty_skipped": int(n_train - len(train)),
        "train_tokens_available": available,
        "last_doc": {"doc": int(train[last]), "tokens": int(tlen[last]), "kept": kept},
    }
    return train[chosen], take, stats


def build_unique_set(directory: Path, spec: UniqueSpec) -> UniqueSet:
    """Pass 2: stream the token shards, writing the selected docs' (kept) tokens to unique.bin."""
    doc, length = doc_lengths(spec.tokens_dir)
    sel_doc, sel_take, stats = select_unique(spec, doc, length)
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / "unique.bin"
    recover_interrupted(dest)
    tmp = temp_sibling(dest)
    parts: list[np.ndarray] = []  # (doc, start, length) rows per batch
    start = 0
    try:
        with open(tmp, "wb") as f:
            for b in _shard_batches(spec.tokens_dir, False, "replay: write unique set"):
                ids = b.column(0).to_numpy().astype(np.int64)
                hit = np.isin(ids, sel_doc)
                if not hit.any():
                    continue
                lists = pc.filter(b.column(1), pa.array(hit))
                n = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
                flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
                keep = sel_take[np.searchsorted(sel_doc, ids[hit])]
                within = np.arange(len(flat), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
                kept = flat[within < np.repeat(keep, n)]
                f.write(np.ascontiguousarray(kept, dtype=dtype).tobytes())
                parts.append(np.stack([ids[hit], start + np.cumsum(keep) - keep, keep], axis=1))
                start += len(kept)
        index = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
        if start + len(sel_doc) != spec.unique_tokens or len(index) != len(sel_doc):
            raise ReplayError(f"{spec.tokens_dir}: token shards changed while the unique set was built")
        _publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    index = index[np.argsort(index[:, 0], kind="stable")].astype(np.int64)  # by doc id, not shard layout
    sha = {"unique.bin": sha256_file(dest), "index.npy": _save_npy(directory / "index.npy", index)}
    meta = {"format": FORMAT, "key": spec.key, "spec": spec.to_dict(), "docs": int(len(index)),
            "tokens": start, "perm": PERM, "sha256": sha, **stats}
    write_json(directory / "unique.json", meta)
    log.info("unique set %s: %d docs, %d tokens", directory, len(index), start)
    return UniqueSet(directory, meta)


def ensure_unique_set(store_root: Path | str, spec: UniqueSpec, verify: bool = True) -> UniqueSet:
    """The store's unique set for `spec`, built (or rebuilt if missing or corrupt) when needed."""
    directory = store_dir(store_root, spec)
    u = _load_unique(directory, spec, verify)
    if u is None:
        spec.check_inputs()
        u = build_unique_set(directory, spec)
    return u


# ------------------------------------------------------------------------------------------- epochs
def epoch_seed(spec: UniqueSpec, epoch: int) -> list[int]:
    """The seed words of epoch `epoch`'s permutation; order_seed 0 keeps the words (and order) of before."""
    return [spec.data_seed, epoch] + ([spec.order_seed] if spec.order_seed else [])


def epoch_paths(directory: Path, epoch: int) -> tuple[Path, Path]:
    return directory / f"epoch-{epoch:05d}.bin", directory / f"epoch-{epoch:05d}.json"


def build_epoch(u: UniqueSet, epoch: int) -> dict[str, Any]:
    """Write epoch `epoch`'s packed stream (EOS before each doc of its permutation), in chunks."""
    spec = u.spec
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    perm = seeded_permutation(u.n_docs, _SALT_EPOCH, *epoch_seed(spec, epoch))
    starts, lens = u.index[perm, 1], u.index[perm, 2]
    cum = np.cumsum(lens + 1)
    cuts = np.unique(np.searchsorted(cum, np.arange(CHUNK_TOKENS, int(cum[-1]), CHUNK_TOKENS), side="right"))
    bounds = [0, *cuts.tolist(), u.n_docs]
    bounds = sorted(set(bounds))
    binp, jsonp = epoch_paths(u.dir, epoch)
    recover_interrupted(binp)
    tmp = temp_sibling(binp)
    h = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb") as f:
            for a, b in progress(list(zip(bounds[:-1], bounds[1:], strict=True)),
                                 desc=f"replay: build epoch {epoch}", unit="chunk"):
                s, n = starts[a:b], lens[a:b]
                width = n + 1
                total = int(width.sum())
                out_start = np.cumsum(width) - width  # where each doc's EOS lands in this chunk
                gather = np.repeat(s - out_start - 1, width) + np.arange(total, dtype=np.int64)
                gather[out_start] = 0  # EOS slots: read anything valid, overwritten next
                out = np.asarray(u.tokens[gather], dtype=dtype)
                out[out_start] = spec.eos_id
                data = out.tobytes()
                h.update(data)
                f.write(data)
                written += total
        _publish(tmp, binp)
    finally:
        tmp.unlink(missing_ok=True)
    info = {"format": FORMAT, "key": spec.key, "epoch": epoch, "seed": epoch_seed(spec, epoch), "perm": PERM,
            "docs": u.n_docs, "tokens": written, "dtype": spec.dtype, "eos_id": spec.eos_id,
            "sha256": h.hexdigest()}
    assert written == u.stream_tokens
    write_json(jsonp, info)
    return info


def epoch_valid(u: UniqueSet, epoch: int, expect_sha256: str | None = None) -> dict[str, Any] | None:
    """The epoch's metadata if its file is present and hash-valid, else None (corrupt ones are logged)."""
    binp, jsonp = epoch_paths(u.dir, epoch)
    if not (binp.exists() and jsonp.exists()):
        return None
    try:
        info = read_json(jsonp)
    except ValueError:
        log.warning("%s: corrupt epoch metadata", jsonp)
        return None
    want = expect_sha256 or info.get("sha256")
    if info.get("key") != u.spec.key or info.get("epoch") != epoch or info.get("sha256") != want:
        log.warning("%s: does not describe epoch %d of store key %s", jsonp, epoch, u.spec.key[:KEY_CHARS])
        return None
    if binp.stat().st_size != info["tokens"] * np.dtype(info["dtype"]).itemsize or sha256_file(binp) != want:
        log.warning("%s: sha256 mismatch (corrupt or truncated epoch file)", binp)
        return None
    return info


def ensure_epoch(u: UniqueSet, epoch: int, expect_sha256: str | None = None) -> tuple[dict[str, Any], bool]:
    """(epoch metadata, built?) - reuse a hash-valid file, else (re)build it deterministically."""
    info = epoch_valid(u, epoch, expect_sha256)
    if info is not None:
        return info, False
    info = build_epoch(u, epoch)
    if expect_sha256 is not None and info["sha256"] != expect_sha256:
        raise ReplayError(f"{epoch_paths(u.dir, epoch)[0]}: rebuilt epoch has sha256 {info['sha256']}, the "
                          f"replay manifest expects {expect_sha256} (inputs or code changed: re-run replay)")
    return info, True


def sequences_per_epoch(stream_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 at stride seq_len that fit in one epoch's stream."""
    return max(0, (stream_tokens - 1) // seq_len)


def epoch_usage(sequences_needed: int, per_epoch: int) -> list[int]:
    """Sequences used of each epoch: whole epochs, then the first part of the last one."""
    if per_epoch <= 0:
        raise ReplayError("an epoch holds no full sequence: budget.unique_tokens is below model.seq_len + 1")
    n = math.ceil(sequences_needed / per_epoch)
    return [min(per_epoch, sequences_needed - e * per_epoch) for e in range(n)]


# ------------------------------------------------------------------------------------------- loader
@dataclass(frozen=True)
class Position:
    """Where the next batch starts: epoch index and offset in sequences within that epoch."""

    epoch: int
    offset: int


class ReplayLoader:
    """Batches of a run's replayed token stream, in order through its epochs, for exact resume.

    Each batch is a torch LongTensor (batch, seq_len + 1): inputs are `[:, :-1]`, targets `[:, 1:]`.
    The last batch is short if the run's sequence count is not a multiple of batch_size (the
    planner makes it one). Epoch files are np.memmap'ed and sha256-verified when first opened;
    with `rebuild` a missing or corrupt one is rebuilt from the inputs recorded in replay.json.

    Data parallel: `batch_size` is the global batch; with `world_size` > 1 each rank gets its
    contiguous slice of every global batch (rows split as by np.array_split), and positions,
    `tokens_served` and state dicts stay global, so every rank resumes from the same state.
    """

    def __init__(self, replay_json: Path | str, batch_size: int, start: Position | None = None,
                 verify: bool = True, rebuild: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size <= batch_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size <= batch")
        self.rank, self.world_size = rank, world_size
        self.path = Path(replay_json)
        self.meta = read_json(self.path)
        if self.meta.get("format") != FORMAT:
            raise ReplayError(f"{self.path}: format {self.meta.get('format')} != {FORMAT} (re-run replay)")
        self.batch_size = batch_size
        self.seq_len = int(self.meta["seq_len"])
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.epochs: list[dict[str, Any]] = self.meta["epochs"]
        self.store = Path(self.meta["store"]["dir"])
        self.spec = UniqueSpec(**self.meta["unique"]["spec"])
        self.verify, self.rebuild = verify, rebuild
        self._cum = np.cumsum([0] + [int(e["sequences_used"]) for e in self.epochs])
        self._g = 0
        self._mm: tuple[int, np.ndarray] | None = None
        if start is not None:
            self.seek(start)

    # ------------------------------------------------------------------------------- positions
    @property
    def sequences_total(self) -> int:
        return int(self._cum[-1])

    @property
    def tokens_total(self) -> int:
        return self.sequences_total * self.seq_len

    @property
    def sequences_served(self) -> int:
        return self._g

    @property
    def tokens_served(self) -> int:
        """Target tokens served since the start of the run (resumed runs count the skipped part)."""
        return self._g * self.seq_len

    @property
    def position(self) -> Position:
        e = int(np.searchsorted(self._cum, self._g, side="right")) - 1
        return Position(e, self._g - int(self._cum[e]))

    def seek(self, pos: Position) -> None:
        n = len(self.epochs)
        ok = 0 <= pos.epoch < n and 0 <= pos.offset <= self.epochs[pos.epoch]["sequences_used"]
        ok = ok or (pos.epoch == n and pos.offset == 0)
        if not ok:
            raise ReplayError(f"{self.path}: position {pos} is outside the run's {n} epochs")
        self._g = int(self._cum[pos.epoch]) + pos.offset

    def state_dict(self) -> dict[str, Any]:
        p = self.position
        return {"epoch": p.epoch, "offset": p.offset, "store_key": self.spec.key, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("store_key") != self.spec.key or state.get("seq_len") != self.seq_len:
            key = str(state.get("store_key"))[:KEY_CHARS]
            raise ReplayError(f"{self.path}: the saved loader state belongs to another replay "
                              f"(store key {key}, seq_len {state.get('seq_len')})")
        self.seek(Position(int(state["epoch"]), int(state["offset"])))

    def __len__(self) -> int:
        """Batches left from the current position."""
        return math.ceil((self.sequences_total - self._g) / self.batch_size)

    # ---------------------------------------------------------------------------------- reading
    def _epoch(self, e: int) -> np.ndarray:
        if self._mm is not None and self._mm[0] == e:
            return self._mm[1]
        ent = self.epochs[e]
        path = Path(ent["path"])
        ok = path.exists() and (not self.verify or sha256_file(path) == ent["sha256"])
        if not ok:
            if not self.rebuild:
                raise ReplayError(f"{path}: missing or sha256 differs from {self.path} (corrupt store file)")
            log.warning("%s: missing or corrupt, rebuilding it from the recorded inputs", path)
            u = ensure_unique_set(self.store.parent, self.spec)
            if u.dir.resolve() != self.store.resolve():
                raise ReplayError(f"{self.path}: store dir {self.store} does not match key {self.spec.key}")
            ensure_epoch(u, int(ent["epoch"]), expect_sha256=ent["sha256"])
        mm = np.memmap(path, dtype=self.dtype, mode="r")
        if len(mm) != int(ent["tokens"]):
            raise ReplayError(f"{path}: {len(mm)} tokens, {self.path} says {ent['tokens']}")
        self._mm = (e, mm)
        return mm

    def _read(self, e: int, offset: int, n: int) -> np.ndarray:
        L = self.seq_len
        flat = np.asarray(self._epoch(e)[offset * L: (offset + n) * L + 1])
        step = flat.itemsize
        win = np.lib.stride_tricks.as_strided(flat, (n, L + 1), (L * step, step), writeable=False)
        return win.astype(np.int64)

    def read_sequences(self, g: int, n: int) -> np.ndarray:
        """Sequences g .. g+n-1 of the run (global indices, across epoch boundaries), int64."""
        parts = [np.zeros((0, self.seq_len + 1), np.int64)]
        while n > 0:
            e = int(np.searchsorted(self._cum, g, side="right")) - 1
            off = g - int(self._cum[e])
            k = min(n, int(self.epochs[e]["sequences_used"]) - off)
            parts.append(self._read(e, off, k))
            g, n = g + k, n - k
        return parts[-1] if len(parts) == 2 else np.concatenate(parts)

    def next_array(self) -> np.ndarray:
        """This rank's part of the next batch, int64 (rows, seq_len + 1); StopIteration at the end."""
        remaining = self.sequences_total - self._g
        if remaining <= 0:
            raise StopIteration
        n = min(self.batch_size, remaining)
        q, r = divmod(n, self.world_size)
        lo = self.rank * q + min(self.rank, r)
        rows = q + (self.rank < r)
        out = self.read_sequences(self._g + lo, rows)
        self._g += n
        return out

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        import torch

        return torch.from_numpy(self.next_array())
