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
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_study.cli import n_workers  # noqa: E402
from moe_study.config.load import load_params  # noqa: E402
from moe_study.data.artefacts import iter_shards, load_manifest  # noqa: E402
from moe_study.data.tokenizer import set_workers, tokenize, train_tokenizer  # noqa: E402


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


def busy_ticks() -> int:
    """Machine-wide non-idle CPU ticks (/proc/stat), to see how much other processes ran meanwhile."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0
    return sum(f) - f[3] - f[4]  # minus idle and iowait


class Measure:
    """Wall seconds, this process's CPU seconds (all threads) and other processes' CPU seconds."""

    def __enter__(self) -> Measure:
        self.t, self.c, self.b = time.perf_counter(), time.process_time(), busy_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t
        self.cpu = time.process_time() - self.c
        self.others = max(0.0, (busy_ticks() - self.b) / os.sysconf("SC_CLK_TCK") - self.cpu)


def raw_encode(tok_path: Path, texts: list[str], batch: int, method: str) -> tuple[Measure, int]:
    """The bare encoder over in-memory texts (fresh tokenizer: cold cache), and its token count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    tok.encode_special_tokens = True
    fn = getattr(tok, method)
    n = 0
    with Measure() as m:
        for i in range(0, len(texts), batch):
            n += sum(len(e) for e in fn(texts[i : i + batch], add_special_tokens=False))
    return m, n


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
    corpus_name = str(corpus)
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"

    with tempfile.TemporaryDirectory(prefix="tokbench-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(corpus, tmp / "corpus")  # a private copy: the corpus may be rebuilt meanwhile
        corpus = tmp / "corpus"
        cm = load_manifest(corpus)
        t0 = time.perf_counter()
        tok = train_tokenizer(corpus, cfg)
        train_s = time.perf_counter() - t0
        tok_path = tmp / "tokenizer.json"
        tok.save(str(tok_path))
        del tok
        texts = load_texts(corpus)
        n_bytes = sum(len(t.encode()) for t in texts)
        stage_params = params.model_copy(update={"tokenizer": cfg.model_copy(update={"path": str(tok_path)})})
        print(f"corpus {corpus_name}: {len(texts)} docs, {n_bytes / 1e6:.1f} MB; trained in {train_s:.1f}s; "
              f"{workers} workers", flush=True)

        runs: dict[str, list[Measure]] = {"raw_encode_batch": [], "raw_encode_batch_fast": [], "stage": []}
        tokens = {}
        for r in range(a.repeats):
            for method in ("encode_batch", "encode_batch_fast"):
                m, n = raw_encode(tok_path, texts, cfg.batch_docs, method)
                runs[f"raw_{method}"].append(m)
                tokens[f"raw_{method}"] = n
            with Measure() as m:
                man = tokenize(stage_params, corpus, tmp / "tokens", metrics_path=None)
            runs["stage"].append(m)
            tokens["stage"] = man["tokens"]
            print(f"repeat {r}: " + ", ".join(
                f"{k} {v[-1].wall:.2f}s (cpu {v[-1].cpu:.2f}s, others {v[-1].others:.2f}s)" for k, v in runs.items()
            ), flush=True)
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"token counts differ between raw and stage: {tokens}")
    n_tok = tokens["stage"]

    def summary(ms: list[Measure]) -> dict:
        wall = statistics.median(x.wall for x in ms)
        best = min(x.wall for x in ms)
        return {"median_s": wall, "min_s": best, "cpu_s": statistics.median(x.cpu for x in ms),
                "others_cpu_s": statistics.median(x.others for x in ms),
                "tokens_per_s": n_tok / wall, "mb_per_s": n_bytes / wall / 1e6,
                "best_tokens_per_s": n_tok / best, "best_mb_per_s": n_bytes / best / 1e6}

    summ = {k: summary(v) for k, v in runs.items()}
    st = summ["stage"]
    ratios = {
        f"stage_vs_{k}": {"median": v["median_s"] / st["median_s"], "best": v["min_s"] / st["min_s"],
                          "cpu": v["cpu_s"] / st["cpu_s"]}
        for k, v in summ.items() if k != "stage"
    }
    result = {
        "command": "python bench/tokenize_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": a.note,
        "machine": machine(),
        "loadavg_at_start": load0,
        "corpus": {"dir": corpus_name, "sha256": cm["sha256"], "docs": len(texts), "bytes": n_bytes,
                   "tokens": n_tok},
        "tokenizer": {"vocab_size": cfg.vocab_size, "train_seconds": train_s,
                      "train_mb_per_s": n_bytes / train_s / 1e6},
        "workers": workers,
        "batch_docs": cfg.batch_docs,
        "repeats": a.repeats,
        "runs": {k: [{"wall_s": x.wall, "cpu_s": x.cpu, "others_cpu_s": x.others} for x in v]
                 for k, v in runs.items()},
        "summary": summ,
        "ratios": ratios,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    mach = result["machine"]
    lines = [
        "# tokenize stage throughput",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores (load average at start {load0}); Python "
        f"{mach['python']}, tokenizers {mach['tokenizers']}, pyarrow {mach['pyarrow']}.",
        f"Corpus: `{corpus_name}` ({len(texts)} docs, {n_bytes / 1e6:.1f} MB, {n_tok:,} tokens, "
        f"{n_bytes / n_tok:.2f} bytes/token){'; ' + a.note if a.note else ''}.",
        f"Vocab {cfg.vocab_size}, batch_docs {cfg.batch_docs}, {workers} rayon workers; {a.repeats} repeats "
        "alternating raw and stage, each with a fresh tokenizer (cold BPE cache).",
        "",
        "| what | median s | best s | tokens/s (median) | MB/s (median) | MB/s (best) | CPU s | others' CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in summ.items():
        lines.append(
            f"| {k} | {v['median_s']:.2f} | {v['min_s']:.2f} | {v['tokens_per_s']:,.0f} | {v['mb_per_s']:.2f} "
            f"| {v['best_mb_per_s']:.2f} | {v['cpu_s']:.2f} | {v['others_cpu_s']:.2f} |"
        )
    lines += ["", "| stage speed relative to | median wall | best wall | CPU time |", "|---|---:|---:|---:|"]
    for k, v in ratios.items():
        lines.append(f"| {k.removeprefix('stage_vs_')} | {v['median']:.2f}x | {v['best']:.2f}x | {v['cpu']:.2f}x |")
    lines += [
        "",
        "`stage` = the whole `moe_study.data.tokenizer.tokenize()` call in load mode (tokenizer.path = the trained "
        "file): read corpus shards (sha256-checked), encode (`encode_batch_fast`), convert ids, write zstd "
        "token shards, hash, manifest. Ratios > 1 mean the stage is faster. \"others' CPU\" is the CPU "
        "time other processes used on the machine meanwhile (contention makes wall times noisy; the CPU "
        "ratio is the contention-free efficiency of the stage).",
        f"BPE training (not in the rows above): {train_s:.1f}s for {n_bytes / 1e6:.1f} MB "
        f"({n_bytes / train_s / 1e6:.1f} MB/s).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
