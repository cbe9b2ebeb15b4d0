"""Throughput of the whole tokenize stage vs raw `Tokenizer.encode_batch` on the same documents.

Why: the stage adds Parquet reading, id conversion, shard writing and hashing around the encoder;
with the reader/encoder/writer threads overlapping that work, it should run at >= 0.9x the speed
of the bare encoder over texts already in memory. Both sides use the same tokenizer file (a fresh
`Tokenizer` each repeat, so the BPE word cache starts cold for both), the same documents, the same
batch size and the same rayon pool (params.tokenizer.workers). Repeats alternate raw and stage and
the median is reported. Tokenizer training is timed once, separately (the stage is run in "load"
mode, `tokenizer.path` = the trained file, so that both sides do the same encoding work).

    python bench/tokenize_bench.py                      # on work/corpus (python -m stages.corpus)
    python bench/tokenize_bench.py --corpus DIR --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.artefacts import iter_shards, load_manifest  # noqa: E402
from stages.common import n_workers  # noqa: E402
from stages.schema import load_params  # noqa: E402
from stages.tokenize import set_workers, tokenize, train_tokenizer  # noqa: E402


def machine() -> dict:
    import pyarrow
    import tokenizers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": n_workers(0),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tokenizers": tokenizers.__version__,
        "pyarrow": pyarrow.__version__,
    }


def load_texts(corpus: Path) -> list[str]:
    return [t for rb in iter_shards(corpus, columns=["text"]) for t in rb.column(0).to_pylist() if t]


def raw_encode(tok_path: Path, texts: list[str], batch: int, method: str) -> tuple[float, int]:
    """Seconds and tokens of the bare encoder over in-memory texts (fresh tokenizer: cold cache)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    tok.encode_special_tokens = True
    fn = getattr(tok, method)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(e) for e in fn(texts[i : i + batch]))
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--corpus", default="work/corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench/tokenize", help="writes OUT.md and OUT.json")
    ap.add_argument("--note", default="", help="what the corpus is (goes in the report)")
    a = ap.parse_args(argv)
    os.environ.setdefault("NO_PROGRESS", "1")
    params = load_params(a.params)
    cfg = params.tokenizer
    workers = set_workers(cfg.workers)  # before the first parallel encode: same pool for both sides
    corpus = Path(a.corpus)
    cm = load_manifest(corpus)

    with tempfile.TemporaryDirectory(prefix="tokbench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tok = train_tokenizer(corpus, cfg)
        train_s = time.perf_counter() - t0
        tok_path = tmp / "tokenizer.json"
        tok.save(str(tok_path))
        del tok
        texts = load_texts(corpus)
        n_bytes = sum(len(t.encode()) for t in texts)
        stage_params = params.model_copy(update={"tokenizer": cfg.model_copy(update={"path": str(tok_path)})})
        print(f"corpus {corpus}: {len(texts)} docs, {n_bytes / 1e6:.1f} MB; trained in {train_s:.1f}s; "
              f"{workers} workers", flush=True)

        rows: dict[str, list[float]] = {"raw_encode_batch": [], "raw_encode_batch_fast": [], "stage": []}
        tokens = {}
        for r in range(a.repeats):
            for method in ("encode_batch", "encode_batch_fast"):
                s, n = raw_encode(tok_path, texts, cfg.batch_docs, method)
                rows[f"raw_{method}"].append(s)
                tokens[f"raw_{method}"] = n
            t0 = time.perf_counter()
            m = tokenize(stage_params, corpus, tmp / "tokens", metrics_path=None)
            rows["stage"].append(time.perf_counter() - t0)
            tokens["stage"] = m["tokens"]
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items()), flush=True)
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"token counts differ between raw and stage: {tokens}")
    n_tok = tokens["stage"]

    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "command": "python bench/tokenize_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": a.note,
        "machine": machine(),
        "corpus": {"dir": str(corpus), "sha256": cm["sha256"], "docs": len(texts), "bytes": n_bytes,
                   "tokens": n_tok},
        "tokenizer": {"vocab_size": cfg.vocab_size, "train_seconds": train_s,
                      "train_mb_per_s": n_bytes / train_s / 1e6},
        "workers": workers,
        "batch_docs": cfg.batch_docs,
        "repeats": a.repeats,
        "seconds": rows,
        "median": {k: {"seconds": s, "tokens_per_s": n_tok / s, "mb_per_s": n_bytes / s / 1e6}
                   for k, s in med.items()},
        "ratio_stage_vs_raw_encode_batch": med["raw_encode_batch"] / med["stage"],
        "ratio_stage_vs_raw_encode_batch_fast": med["raw_encode_batch_fast"] / med["stage"],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# tokenize stage throughput",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; Python "
        f"{result['machine']['python']}, tokenizers {result['machine']['tokenizers']}, "
        f"pyarrow {result['machine']['pyarrow']}.",
        f"Corpus: `{corpus}` ({len(texts)} docs, {n_bytes / 1e6:.1f} MB, {n_tok} tokens, "
        f"{n_bytes / n_tok:.2f} bytes/token){'; ' + a.note if a.note else ''}.",
        f"Vocab {cfg.vocab_size}, batch_docs {cfg.batch_docs}, {workers} rayon workers, "
        f"median of {a.repeats} alternating repeats (fresh tokenizer each, cold BPE cache).",
        "",
        "| what | seconds | tokens/s | MB/s | stage speed / this |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, s in med.items():
        rel = s / med["stage"]
        lines.append(f"| {k} | {s:.2f} | {n_tok / s:,.0f} | {n_bytes / s / 1e6:.2f} | {rel:.2f}x |")
    lines += [
        "",
        "`stage` = the whole `stages.tokenize.tokenize()` call in load mode: read corpus shards "
        "(sha256-checked), encode, convert ids, write zstd token shards, hash, manifest.",
        f"BPE training (not in the rows above): {train_s:.1f}s for {n_bytes / 1e6:.1f} MB "
        f"({n_bytes / train_s / 1e6:.1f} MB/s).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
