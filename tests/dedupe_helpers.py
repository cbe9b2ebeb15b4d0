"""Test helpers for dedupe/split: token shards in the tokenize stage's format, without a tokenizer.

A word-level "tokenizer" (whitespace split, case kept, one id per distinct word) stands in for BPE
so these tests do not wait on the tokenize stage; the shard format is the real one
(stages.artefacts.ShardWriter + token_schema).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from stages.artefacts import ShardWriter, token_schema


def write_token_shards(
    directory: Path, texts: list[str], ids: list[str] | None = None, sources: list[str] | None = None,
    docs_per_shard: int = 400, dtype: str = "uint32",
) -> dict:
    ids = ids or [f"d{i:06d}" for i in range(len(texts))]
    sources = sources or ["synthetic"] * len(texts)
    vocab: dict[str, int] = {"<|endoftext|>": 0}
    toks = [np.array([vocab.setdefault(w, len(vocab)) for w in t.split()], dtype=np.int64) for t in texts]
    writer = ShardWriter(directory, "tokens", token_schema(dtype))
    for s in range(0, len(texts), docs_per_shard):
        e = min(s + docs_per_shard, len(texts))
        writer.write(pa.table({
            "doc": pa.array(np.arange(s, e), pa.int64()),
            "id": ids[s:e],
            "source": sources[s:e],
            "n_bytes": [len(t.encode()) for t in texts[s:e]],
            "tokens": [t.tolist() for t in toks[s:e]],
        }))
    return writer.finish(dtype=dtype, vocab_size=len(vocab), eos_id=0, eos_appended=False,
                         tokens=int(sum(len(t) for t in toks)), docs=len(texts), tokenizer_sha256="0" * 64)


def planted_metrics(dup_of: list[int], kind: list[str], keep: np.ndarray, cluster: np.ndarray) -> dict:
    """Recall of planted copies (removed and clustered with their original), false removals."""
    dup_of_a = np.asarray(dup_of)
    planted = np.flatnonzero(dup_of_a >= 0)
    found = ~keep[planted] & (cluster[planted] == cluster[dup_of_a[planted]])
    removed = np.flatnonzero(~keep)
    correct = (dup_of_a[removed] >= 0) & (cluster[removed] == cluster[np.maximum(dup_of_a[removed], 0)])
    originals = np.asarray(kind) == "original"
    return {
        "recall": float(found.mean()) if len(planted) else 1.0,
        "precision": float(correct.mean()) if len(removed) else 1.0,
        "false_removal": float((~keep[originals]).mean()),
        "planted": len(planted),
        "removed": len(removed),
    }
