"""Test helpers for dedupe/split: token shards in the tokenize stage's format, without a tokenizer.

A word-level "tokenizer" (whitespace split, case kept, one id per distinct word) stands in for BPE
so these tests do not wait on the tokenize stage; the shard format is the real one
(moe_study.data.artefacts.ShardWriter + token_schema).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moe_study.data.artefacts import ShardWriter, token_schema
from moe_study.hashing import sha256_file


def write_token_shards(
    directory: Path, texts: list[str], ids: list[str] | None = None, sources: list[str] | None = None,
    docs_per_shard: int = 400, dtype: str = "uint32", tokenizer: Any = None,
) -> dict:
    """Token shards + manifest + tokenizer.json. Default tokenizer: word level (whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ids = ids or [f"d{i:06d}" for i in range(len(texts))]
    sources = sources or ["synthetic"] * len(texts)
    if tokenizer is None:
        vocab: dict[str, int] = {"<|endoftext|>": 0}
        for t in texts:
            for w in t.split():
                vocab.setdefault(w, len(vocab))
        tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    toks = [e.ids for e in tokenizer.encode_batch(texts)] if texts else []
    directory = Path(directory)
    writer = ShardWriter(directory, "tokens", token_schema(dtype))
    for s in range(0, len(texts), docs_per_shard):
        e = min(s + docs_per_shard, len(texts))
        writer.write(pa.table({
            "doc": pa.array(np.arange(s, e), pa.int64()),
            "id": ids[s:e],
            "source": sources[s:e],
            "n_bytes": [len(t.encode()) for t in texts[s:e]],
            "tokens": toks[s:e],
        }))
    tokenizer.save(str(directory / "tokenizer.json"))
    return writer.finish(dtype=dtype, vocab_size=tokenizer.get_vocab_size(), eos_id=0, eos_appended=False,
                         tokens=int(sum(len(t) for t in toks)), docs=len(texts), tokenizer_file="tokenizer.json",
                         tokenizer_sha256=sha256_file(directory / "tokenizer.json"))


def byte_level_bpe(texts: list[str], vocab_size: int = 1000) -> Any:
    """A byte-level BPE like the tokenize stage's (GPT-2 style pre-tokenizer, no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok
