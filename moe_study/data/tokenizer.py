"""Train (or load) a byte-level BPE tokenizer and encode every document into token shards.

Why it looks like this:
- Byte-level BPE (HF `tokenizers`) encodes any text losslessly, so decoding a document's tokens
  gives back its text exactly and bits per byte are well defined (`n_bytes` is stored per doc).
- The tokenizer is trained on a deterministic sample capped by `train_max_bytes`: when the corpus
  is larger than the cap, a document is taken when a fixed hash of its corpus position falls below
  cap / corpus bytes, so the sample is spread over every source rather than being the first files.
  HF BPE training is deterministic (merge ties break on pair ids, the byte alphabet is sorted, the
  vocabulary is serialized by id); we verified byte-identical tokenizer.json with 1 and 2 rayon
  threads, and tests/test_tokenize.py checks it on every run.
- Encoding is a three-thread pipeline: a reader thread streams corpus batches (Parquet decode,
  Arrow -> str), an encoder thread calls `encode_batch_fast` (rayon over all cores, GIL released),
  and the main thread turns token ids into Arrow lists through numpy and writes shards. I/O and
  conversion therefore overlap with encoding, and memory is bounded by a few batches plus one shard.
- Token lists hold the document's tokens only; no EOS is appended (`eos_appended: false` in the
  manifest). Consumers that pack documents insert `eos_id` between them. Special-token strings that
  occur literally in a text are encoded as ordinary bytes (`encode_special_tokens`), so the data
  never contains an EOS the packer did not put there.
- `doc` is the document's position in the corpus; positions of skipped (empty) documents are absent.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moe_study.cli import Timer, n_workers, progress
from moe_study.config.schema import Params, TokenizerConfig
from moe_study.data.artefacts import ShardError, ShardWriter, iter_shards, load_manifest, token_dtype, token_schema
from moe_study.hashing import sha256_file, splitmix64
from moe_study.io import WORK, atomic_path, write_json
from moe_study.provenance import provenance

CORPUS_DIR = WORK / "corpus"
TOKENS_DIR = WORK / "tokens"
METRICS_PATH = WORK / "metrics" / "tokenize.json"
TOKENIZER_FILE = "tokenizer.json"
SAMPLE_SALT = 0x5DEECE66D  # fixed: the training sample depends only on the corpus and the byte cap
MAX_SHARD_TOKENS = (1 << 31) - 1  # list<> columns use int32 offsets
T = TypeVar("T")

log = logging.getLogger("stages.tokenize")


class TokenizerError(ValueError):
    """A tokenizer setting or file that cannot be used (the message names the params field)."""


# ------------------------------------------------------------------------------------- tokenizer
def new_tokenizer() -> Any:
    """An untrained byte-level BPE: ByteLevel pre-tokenizer and decoder, no prefix space (lossless)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def corpus_bytes(corpus_dir: Path | str) -> tuple[int, int]:
    """(documents, UTF-8 bytes of all texts), streamed over the text column only."""
    docs = total = 0
    for rb in iter_shards(corpus_dir, columns=["text"]):
        docs += rb.num_rows
        total += int(pc.sum(pc.binary_length(rb.column(0))).as_py() or 0)
    return docs, total


def training_sample(
    corpus_dir: Path | str, max_bytes: int, batch_docs: int, stats: dict[str, int] | None = None
) -> Iterator[list[str]]:
    """Batches of training texts: every document if the corpus fits in `max_bytes`, else the docs
    whose position hash falls below max_bytes / corpus bytes, in corpus order, up to the first one
    that would take the sample past `max_bytes`.

    `stats` (if given) receives docs/bytes of the sample once the iterator is exhausted.
    """
    _, total = corpus_bytes(corpus_dir)
    rate = 1.0 if total <= max_bytes else max_bytes / total
    threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
    taken_docs = taken_bytes = 0
    start = 0
    for rb in iter_shards(corpus_dir, columns=["text"], batch_rows=batch_docs, verify=False):
        col = rb.column(0)
        nbytes = pc.fill_null(pc.binary_length(col), 0).to_numpy().astype(np.int64)
        keep = nbytes > 0
        if rate < 1.0:
            keep &= splitmix64(np.arange(start, start + rb.num_rows) ^ SAMPLE_SALT) < threshold
        start += rb.num_rows
        # the cap ends the sample at the first selected doc that does not fit (independent of batching)
        cum = taken_bytes + np.cumsum(np.where(keep, nbytes, 0))
        full = bool((keep & (cum > max_bytes)).any())
        keep &= cum <= max_bytes
        idx = np.flatnonzero(keep)
        if len(idx):
            taken_docs += len(idx)
            taken_bytes += int(nbytes[idx].sum())
            yield col.take(pa.array(idx)).to_pylist()
        if full:
            break
    if stats is not None:
        stats.update(docs=taken_docs, bytes=taken_bytes, corpus_bytes=total)


def check_config(cfg: TokenizerConfig) -> None:
    """Settings the schema cannot check alone; raised before any compute."""
    if len(set(cfg.special_tokens)) != len(cfg.special_tokens) or not all(cfg.special_tokens):
        raise TokenizerError(
            f"tokenizer.special_tokens must be distinct non-empty strings: {cfg.special_tokens}"
        )
    if cfg.path is None and cfg.vocab_size < 256 + len(cfg.special_tokens):
        raise TokenizerError(
            f"tokenizer.vocab_size={cfg.vocab_size} is below 256 byte tokens + "
            f"{len(cfg.special_tokens)} special tokens"
        )


def train_tokenizer(corpus_dir: Path | str, cfg: TokenizerConfig, stats: dict[str, int] | None = None) -> Any:
    """Byte-level BPE with `cfg.vocab_size` ids; the special tokens take ids 0.. (EOS is id 0)."""
    from tokenizers import pre_tokenizers, trainers

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(training_sample(corpus_dir, cfg.train_max_bytes, cfg.batch_docs, stats), trainer)
    return tok


def read_tokenizer(path: Path | str, cfg: TokenizerConfig) -> Any:
    """The user's tokenizer.json from `tokenizer.path`, checked to contain the EOS token."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer.path: {path} not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception on bad JSON / unknown model
        raise TokenizerError(f"tokenizer.path: {path} is not a valid tokenizer.json ({err})") from None
    if tok.token_to_id(cfg.eos) is None:
        raise TokenizerError(
            f"tokenizer.path: {path} has no token for the EOS {cfg.eos!r} (tokenizer.special_tokens[0])"
        )
    return for_documents(tok)


def for_documents(tok: Any) -> Any:
    """Set a tokenizer to encode whole documents as the token shards hold them: never truncated or
    padded (a tokenizer.json may enable both), and special-token strings in text encoded as bytes.
    Encode with `add_special_tokens=False` too, so no post-processor adds BOS/EOS."""
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True
    return tok


def vocab_extent(tok: Any) -> int:
    """One more than the largest id: the embedding rows a model needs (ids may be sparse)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_manifest(tokens_dir: Path | str = TOKENS_DIR) -> dict[str, Any]:
    """The token shard manifest, checked to be one (shard list hash, the fields consumers use)."""
    m = load_manifest(tokens_dir)
    needed = ("dtype", "vocab_size", "eos_id", "tokens", "docs", "tokenizer_sha256")
    missing = [k for k in needed if k not in m]
    if missing:
        raise ShardError(f"{Path(tokens_dir) / 'manifest.json'}: not a token manifest (missing {missing})")
    return m


def load_tokenizer(tokens_dir: Path | str = TOKENS_DIR) -> Any:
    """The tokenizer that made the token shards (hash-checked), set up by `for_documents`: encoding
    a text with it (`add_special_tokens=False`) gives exactly the tokens the shards hold."""
    from tokenizers import Tokenizer

    path = Path(tokens_dir) / TOKENIZER_FILE
    m = token_manifest(tokens_dir)
    if not path.is_file():
        raise ShardError(f"{path}: missing")
    if sha256_file(path) != m["tokenizer_sha256"]:
        raise ShardError(f"{path}: sha256 differs from manifest.json (corrupt or replaced tokenizer)")
    return for_documents(Tokenizer.from_file(str(path)))


# -------------------------------------------------------------------------------------- pipeline
_END = object()


@dataclass
class _Failure:
    err: BaseException


def threaded(gen_fn: Callable[[], Iterator[T]], maxsize: int = 3, name: str = "producer") -> Iterator[T]:
    """Run the generator `gen_fn()` in a daemon thread, yielding its items in order through a bounded
    queue; its exception is re-raised here. Closing this iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            with contextlib.closing(gen_fn()) as gen:
                for item in gen:
                    if not put(item):
                        return
            put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread
            put(_Failure(err))

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            if isinstance(item, _Failure):
                raise item.err
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


@dataclass
class DocBatch:
    doc: np.ndarray  # int64 corpus positions
    id: pa.Array
    source: pa.Array
    n_bytes: np.ndarray  # int64
    texts: list[str]
    skipped: int


def read_batches(corpus_dir: Path | str, batch_docs: int) -> Iterator[DocBatch]:
    """Corpus record batches as encoder input; empty (or null) texts are dropped and counted."""
    start = 0
    for rb in iter_shards(corpus_dir, columns=["id", "source", "text"], batch_rows=batch_docs):
        n = rb.num_rows
        text = rb.column("text")
        n_bytes = pc.fill_null(pc.binary_length(text), 0).to_numpy().astype(np.int64)
        doc = np.arange(start, start + n, dtype=np.int64)
        start += n
        keep = n_bytes > 0
        skipped = int(n - keep.sum())
        ids, sources = rb.column("id"), rb.column("source")
        if skipped:
            mask = pa.array(keep)
            text, ids, sources = text.filter(mask), ids.filter(mask), sources.filter(mask)
            doc, n_bytes = doc[keep], n_bytes[keep]
        yield DocBatch(doc, ids, sources, n_bytes, text.to_pylist(), skipped)


def tokens_array(encodings: list[Any], dtype: str) -> pa.ListArray:
    """Arrow list<dtype> of the encodings' ids, via numpy (no per-token Python loop)."""
    lens = np.fromiter((len(e) for e in encodings), np.int64, count=len(encodings))
    offsets = np.zeros(len(encodings) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    total = int(offsets[-1])
    if total > MAX_SHARD_TOKENS:
        raise TokenizerError(
            f"a batch of {len(encodings)} docs has {total} tokens; lower tokenizer.batch_docs"
        )
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.dtype(dtype), count=total)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))


@dataclass
class EncodeStats:
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped_empty: int = 0
    seconds: float = 0.0


def encode_corpus(
    tok: Any, corpus_dir: Path | str, writer: ShardWriter, cfg: TokenizerConfig, dtype: str
) -> EncodeStats:
    """Encode every document (reader thread -> encoder thread -> this thread writes shards)."""
    timer = Timer()
    corpus = load_manifest(corpus_dir)
    n_batches = sum(-(-int(s["rows"]) // cfg.batch_docs) for s in corpus["shards"])
    schema = token_schema(dtype)
    stats = EncodeStats()
    pending: list[pa.Table] = []
    pending_rows = 0

    def encoded() -> Iterator[tuple[DocBatch, list[Any]]]:
        for b in threaded(lambda: read_batches(corpus_dir, cfg.batch_docs), 2, "tokenize-reader"):
            yield b, (tok.encode_batch_fast(b.texts, add_special_tokens=False) if b.texts else [])

    def flush(rows: int) -> None:
        nonlocal pending, pending_rows
        # one contiguous chunk per column, so the file bytes do not depend on the batching
        table = pa.concat_tables(pending).combine_chunks()
        shard, rest = table.slice(0, rows), table.slice(rows)
        n_tok = int(pc.sum(pc.list_value_length(shard.column("tokens"))).as_py() or 0)
        if n_tok > MAX_SHARD_TOKENS:
            raise TokenizerError(f"a shard of {rows} docs has {n_tok} tokens; lower tokenizer.docs_per_shard")
        n_bytes = int(pc.sum(shard.column("n_bytes")).as_py() or 0)
        writer.write(shard, tokens=n_tok, bytes=n_bytes)
        pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    # Encoding objects are large (~90 bytes/token: ids, token strings, offsets), so at most one
    # batch waits in the queue while the next is encoded and the previous one converted
    it = threaded(encoded, 1, "tokenize-encoder")
    with contextlib.closing(it):
        for b, encs in progress(it, total=n_batches, desc="tokenize", unit="batch"):
            stats.skipped_empty += b.skipped
            if not encs:
                continue
            toks = tokens_array(encs, dtype)
            encs, b.texts = [], []  # free the Encodings (~90 bytes/token) before waiting for the next batch
            stats.docs += len(toks)
            stats.tokens += len(toks.values)
            stats.bytes += int(b.n_bytes.sum())
            cols = [pa.array(b.doc), b.id, b.source, pa.array(b.n_bytes), toks]
            pending.append(pa.Table.from_arrays(cols, schema=schema))
            pending_rows += len(toks)
            while pending_rows >= cfg.docs_per_shard:
                flush(cfg.docs_per_shard)
    if pending_rows:
        flush(pending_rows)
    stats.seconds = timer.seconds
    return stats


# ----------------------------------------------------------------------------------------- stage
def release_memory() -> None:
    """Hand freed heap back to the OS. BPE training frees its word and pair tables when it returns,
    but glibc keeps the pages; without this the encoding phase stacks on top of them (peak RSS of
    the default study drops from ~450 to ~370 MB)."""
    import ctypes
    import ctypes.util

    gc.collect()
    pa.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)


def set_workers(workers: int) -> int:
    """Size rayon's pool (used by tokenizers) before its first parallel call; 0 = all cores."""
    n = n_workers(workers)
    os.environ["RAYON_NUM_THREADS"] = str(n)
    return n


def tokenize(
    params: Params,
    corpus_dir: Path | str = CORPUS_DIR,
    out_dir: Path | str = TOKENS_DIR,
    metrics_path: Path | str | None = METRICS_PATH,
) -> dict[str, Any]:
    """Run the stage: tokenizer.json + token shards into `out_dir` (atomically) and the metrics JSON.

    Returns the token manifest."""
    cfg = params.tokenizer
    check_config(cfg)
    corpus = load_manifest(corpus_dir)  # fail before any compute when the corpus is missing/bad
    workers = set_workers(cfg.workers)
    total = Timer()
    sample: dict[str, int] = {}
    inputs = {"corpus": corpus["sha256"]}
    if cfg.path is not None:
        tok = read_tokenizer(cfg.path, cfg)
        inputs["tokenizer"] = sha256_file(cfg.path)
        source = f"loaded {cfg.path}"
        train_s = 0.0
    else:
        t = Timer()
        tok = train_tokenizer(corpus_dir, cfg, sample)
        train_s = t.seconds
        release_memory()
        for_documents(tok)
        source = "trained"
        log.info("trained BPE on %d docs (%.1f MB) in %.1fs", sample["docs"], sample["bytes"] / 1e6, train_s)
    vocab = vocab_extent(tok)
    dtype = token_dtype(vocab)
    eos_id = int(tok.token_to_id(cfg.eos))
    if cfg.path is None and vocab != cfg.vocab_size:
        log.warning("corpus gave %d ids, below tokenizer.vocab_size=%d", vocab, cfg.vocab_size)
    log.info("vocab %d (%s), EOS %r = %d, %d workers", vocab, dtype, cfg.eos, eos_id, workers)

    with atomic_path(out_dir) as tmp:
        writer = ShardWriter(tmp, "tokens", token_schema(dtype))
        tok.save(str(tmp / TOKENIZER_FILE))
        tok_sha = sha256_file(tmp / TOKENIZER_FILE)
        st = encode_corpus(tok, corpus_dir, writer, cfg, dtype)
        if st.docs == 0:
            raise TokenizerError(f"{corpus_dir}: no non-empty documents ({st.skipped_empty} empty skipped)")
        manifest = writer.finish(
            docs=st.docs,
            tokens=st.tokens,
            bytes=st.bytes,
            skipped_empty=st.skipped_empty,
            dtype=dtype,
            vocab_size=vocab,
            vocab_size_requested=cfg.vocab_size,
            eos_id=eos_id,
            eos_token=cfg.eos,
            eos_appended=False,
            special_tokens={t: tok.token_to_id(t) for t in cfg.special_tokens},
            tokenizer_file=TOKENIZER_FILE,
            tokenizer_sha256=tok_sha,
            tokenizer_source=source,
            train_sample=sample,
            corpus_sha256=corpus["sha256"],
            provenance=provenance("tokenize", inputs, cfg.model_dump()),
        )
    rate = st.tokens / st.seconds if st.seconds else 0.0
    log.info(
        "%d docs, %d tokens, %.2f bytes/token, %.0f tokens/s (%.1f MB/s), %d empty skipped",
        st.docs, st.tokens, st.bytes / max(st.tokens, 1), rate, st.bytes / max(st.seconds, 1e-9) / 1e6,
        st.skipped_empty,
    )
    if metrics_path is not None:
        write_json(
            metrics_path,
            {
                "docs": st.docs,
                "tokens": st.tokens,
                "bytes": st.bytes,
                "bytes_per_token": st.bytes / max(st.tokens, 1),
                "tokens_per_s": rate,
                "mb_per_s": st.bytes / max(st.seconds, 1e-9) / 1e6,
                "skipped_empty": st.skipped_empty,
                "vocab_size": vocab,
                "dtype": dtype,
                "workers": workers,
                "seconds": {"train": train_s, "encode": st.seconds, "total": total.seconds},
                "train_sample": sample,
                "tokens_sha256": manifest["sha256"],
                "provenance": manifest["provenance"],
            },
        )
    return manifest
