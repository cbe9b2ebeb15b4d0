"""tokenize stage: determinism, dtype, lossless round trip, loaded tokenizers, clear errors."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY

from moe_study.config.schema import Params, parse_params
from moe_study.data.artefacts import DOC_SCHEMA, ShardError, ShardWriter, iter_shards, load_manifest
from moe_study.data.tokenizer import (
    TOKENIZER_FILE,
    TokenizerError,
    load_tokenizer,
    new_tokenizer,
    token_manifest,
    tokenize,
    training_sample,
)
from moe_study.hashing import sha256_file
from stages.tokenize import main

ROOT = Path(__file__).resolve().parent.parent
_WORDS = ("the of and to in is was he for it with as his on be at by had are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out "
         "so said what up its about into than them can only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people")
WORDS = _WORDS.split()


def texts(n: int = 160, seed: int = 0) -> list[str]:
    """English-like documents plus the awkward cases: unicode, a literal EOS string, whitespace, an empty doc."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
                 for _ in range(rng.randint(1, 6))]
        out.append(("\n\n" if i % 7 == 0 else " ").join(sents))
    out[3] = "Café naïve résumé — 日本語のテキスト 🙂 and tabs\tand\r\nCRLF lines."
    out[5] = "A document that mentions <|endoftext|> literally, mid-text."
    out[8] = "   \n\t  "
    out[11] = ""  # empty: counted and skipped
    return out


def make_corpus(d: Path, docs: list[str], per_shard: int = 50) -> Path:
    w = ShardWriter(d, "docs", DOC_SCHEMA)
    for i in range(0, len(docs), per_shard):
        chunk = docs[i : i + per_shard]
        w.write(pa.table({"id": [f"d{i + j}" for j in range(len(chunk))],
                          "source": ["synthetic"] * len(chunk), "text": chunk}))
    w.finish(docs=len(docs))
    return d


def params(**tok) -> Params:
    p = copy.deepcopy(TINY)
    p["tokenizer"] = {"vocab_size": 320, "docs_per_shard": 64, "batch_docs": 16, **tok}
    return parse_params(p)


def run(tmp: Path, corpus: Path, name: str, **tok) -> tuple[dict, Path]:
    out = tmp / name
    m = tokenize(params(**tok), corpus, out, tmp / f"{name}.metrics.json")
    return m, out


def shard_files(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.name != "manifest.json"}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus", texts())


def test_outputs_round_trip_and_counts(tmp_path: Path, corpus: Path) -> None:
    m, out = run(tmp_path, corpus, "tok")
    docs = texts()
    assert m["skipped_empty"] == 1 and m["docs"] == len(docs) - 1
    assert [s["rows"] for s in m["shards"]] == [64, 64, 31]  # docs_per_shard across batch boundaries
    assert m["dtype"] == "uint16" and m["vocab_size"] == 320 and m["eos_id"] == 0 and not m["eos_appended"]
    assert m["provenance"]["inputs"]["corpus"] == load_manifest(corpus)["sha256"]
    tok = load_tokenizer(out)
    assert token_manifest(out)["sha256"] == m["sha256"]
    rows = [r for b in iter_shards(out) for r in b.to_pylist()]
    assert [r["doc"] for r in rows] == [i for i in range(len(docs)) if i != 11]  # corpus positions
    n_tokens = 0
    for r in rows:
        text = docs[r["doc"]]
        assert r["id"] == f"d{r['doc']}" and r["n_bytes"] == len(text.encode())
        assert tok.decode(r["tokens"], skip_special_tokens=False) == text
        assert m["eos_id"] not in r["tokens"]  # a literal "<|endoftext|>" is encoded as bytes
        assert max(r["tokens"]) < m["vocab_size"]
        n_tokens += len(r["tokens"])
    assert n_tokens == m["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert pq.read_schema(out / "tokens-00000.parquet").field("tokens").type == pa.list_(pa.uint16())
    metrics = json.loads((tmp_path / "tok.metrics.json").read_text())
    assert metrics["tokens"] == n_tokens and metrics["bytes"] == sum(len(t.encode()) for t in docs)
    assert metrics["tokens_per_s"] > 0 and "provenance" in metrics


def test_deterministic_and_independent_of_batching(tmp_path: Path, corpus: Path) -> None:
    m1, a = run(tmp_path, corpus, "a")
    m2, b = run(tmp_path, corpus, "b")
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert shard_files(a) == shard_files(b) and TOKENIZER_FILE in shard_files(a)
    m3, c = run(tmp_path, corpus, "c", batch_docs=7)  # other batches: same tokenizer and shard bytes
    assert shard_files(a) == shard_files(c) and m3["sha256"] == m1["sha256"]


def test_deterministic_across_thread_counts(tmp_path: Path, corpus: Path) -> None:
    """BPE training and encoding with one rayon thread (subprocess) give the same bytes as all cores."""
    _, a = run(tmp_path, corpus, "all")
    code = (
        "import sys, copy; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
        "from conftest import TINY\nfrom moe_study.config.schema import parse_params\n"
        "from moe_study.data.tokenizer import tokenize\n"
        "p = copy.deepcopy(TINY); p['tokenizer'] = {'vocab_size': 320, 'docs_per_shard': 64, 'batch_docs': 16,"
        " 'workers': 1}\n"
        "tokenize(parse_params(p), sys.argv[2], sys.argv[3], None)\n"
    )
    env = {**os.environ, "NO_PROGRESS": "1"}
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(corpus), str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    assert shard_files(a) == shard_files(tmp_path / "one")


def test_training_sample_is_capped_and_spread(tmp_path: Path, corpus: Path) -> None:
    total = sum(len(t.encode()) for t in texts())
    stats: dict = {}
    batches = list(training_sample(corpus, total // 3, 16, stats))
    sample = [t for b in batches for t in b]
    assert 0 < stats["bytes"] <= total // 3 and stats["docs"] == len(sample)
    assert sum(len(t.encode()) for t in sample) == stats["bytes"] and stats["corpus_bytes"] == total
    positions = sorted(texts().index(t) for t in sample)
    assert positions[-1] > len(texts()) // 2  # a hashed sample, not the head of the corpus
    assert [t for b in training_sample(corpus, total // 3, 5) for t in b] == sample  # deterministic
    everything = [t for b in training_sample(corpus, total, 16) for t in b]
    assert everything == [t for t in texts() if t]


def big_vocab_tokenizer(path: Path, size: int) -> Path:
    """A byte-level BPE whose ids reach `size` - 1 (fillers above the bytes), saved as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), size)})
    base = new_tokenizer()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = base.pre_tokenizer, base.decoder
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(path))
    return path


@pytest.mark.parametrize(("size", "dtype"), [(65536, "uint16"), (65537, "uint32")])
def test_dtype_follows_vocab_size(tmp_path: Path, corpus: Path, size: int, dtype: str) -> None:
    path = big_vocab_tokenizer(tmp_path / "big.json", size)
    m, out = run(tmp_path, corpus, "big", path=str(path))
    assert m["dtype"] == dtype and m["vocab_size"] == size
    arrow = {"uint16": pa.uint16(), "uint32": pa.uint32()}[dtype]
    assert pq.read_schema(out / "tokens-00000.parquet").field("tokens").type == pa.list_(arrow)
    tok = load_tokenizer(out)
    for r in next(iter_shards(out)).to_pylist():
        assert tok.decode(r["tokens"], skip_special_tokens=False) == texts()[r["doc"]]


def test_loads_a_given_tokenizer(tmp_path: Path, corpus: Path) -> None:
    """A given tokenizer.json is used as is, except truncation, padding and post-processor EOS/BOS,
    which would silently cut or change documents."""
    from tokenizers import Tokenizer, processors

    _, trained = run(tmp_path, corpus, "trained")
    ref = Tokenizer.from_file(str(trained / TOKENIZER_FILE))
    given = tmp_path / "given.json"
    tok = Tokenizer.from_file(str(trained / TOKENIZER_FILE))
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=8)
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(given))
    other_texts = texts(60, seed=1)
    other = make_corpus(tmp_path / "other", other_texts)
    m, out = run(tmp_path, other, "loaded", path=str(given), vocab_size=4096)
    assert m["tokenizer_source"] == f"loaded {given}" and m["vocab_size"] == 320  # the file's, not params'
    assert m["provenance"]["inputs"]["tokenizer"] == sha256_file(given)
    assert m["train_sample"] == {}
    ref.encode_special_tokens = True
    rows = [r for b in iter_shards(out) for r in b.to_pylist()]
    assert max(len(r["tokens"]) for r in rows) > 8
    for r in rows:
        assert r["tokens"] == ref.encode(other_texts[r["doc"]], add_special_tokens=False).ids
    assert load_tokenizer(out).encode(other_texts[0], add_special_tokens=False).ids == rows[0]["tokens"]


def write_params(tmp: Path, **tok) -> Path:
    p = copy.deepcopy(TINY)
    p["tokenizer"] = {"vocab_size": 320, **tok}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (None, "not found"),
        ("{not json", "not a valid tokenizer.json"),
        ("NO_EOS", "tokenizer.special_tokens[0]"),
    ],
)
def test_bad_tokenizer_path_is_a_clear_error(tmp_path: Path, corpus: Path, content, expect, capsys) -> None:
    path = tmp_path / "tok.json"
    if content == "NO_EOS":
        new_tokenizer().save(str(path))  # valid file, but no <|endoftext|> token
    elif content is not None:
        path.write_text(content)
    with pytest.raises(TokenizerError, match="tokenizer.path") as err:
        tokenize(params(path=str(path)), corpus, tmp_path / "out", None)
    assert expect in str(err.value)
    pf = write_params(tmp_path, path=str(path))
    with pytest.raises(SystemExit) as ex:
        main(["--params", str(pf), "--corpus", str(corpus), "--out", str(tmp_path / "out"),
              "--metrics", str(tmp_path / "m.json")])
    assert ex.value.code == 2 and "tokenizer.path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_too_small_vocab_names_the_field(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.vocab_size"):
        tokenize(params(vocab_size=260, special_tokens=["<a>", "<b>", "<c>", "<d>", "<e>"]), corpus,
                 tmp_path / "out", None)


def test_all_empty_corpus_is_an_error(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "empty", ["", ""])
    given = big_vocab_tokenizer(tmp_path / "t.json", 300)
    with pytest.raises(TokenizerError, match="no non-empty documents"):
        tokenize(params(path=str(given)), corpus, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_is_a_clear_error(tmp_path: Path, corpus: Path, capsys) -> None:
    shard = corpus / "docs-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="docs-00001.parquet"):
        tokenize(params(), corpus, tmp_path / "out", None)
    pf = write_params(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ex:
        main(["--params", str(pf), "--corpus", str(corpus), "--out", str(out), "--metrics", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "docs-00001.parquet" in err and "sha256" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-out-*"))  # atomic: nothing half-written


def test_corrupt_shard_during_encoding_leaves_old_output(tmp_path: Path, corpus: Path) -> None:
    """A shard that passes the hash check but is not Parquet fails in the reader thread, cleanly."""
    _, out = run(tmp_path, corpus, "out")
    before = shard_files(out)
    given = tmp_path / "given.json"  # load mode: the first read of the bad shard is the encoder's
    given.write_bytes((out / TOKENIZER_FILE).read_bytes())
    m = json.loads((corpus / "manifest.json").read_text())
    bad = corpus / m["shards"][-1]["file"]
    bad.write_bytes(b"not parquet at all")
    m["shards"][-1]["sha256"] = sha256_file(bad)
    from moe_study.hashing import sha256_json

    m["sha256"] = sha256_json(m["shards"])
    (corpus / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="unreadable Parquet"):
        run(tmp_path, corpus, "out", path=str(given))
    assert shard_files(out) == before
