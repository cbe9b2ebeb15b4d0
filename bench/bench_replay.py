"""Benchmark of the replay store: build time and peak memory of the unique set and epochs, loader rate.

Usage: python bench/bench_replay.py [--docs 200000] [--unique 50000000] [--epochs 3.5] [--out results/bench]

Synthetic token shards (log-normal doc lengths, uint16) are written to a temp dir; the replay is
built in a child process so that its peak RSS (ru_maxrss, which counts memory-mapped pages it
touched, i.e. reclaimable page cache) is measured alone, and its peak numpy/Python heap with
tracemalloc (the memory the build really needs; build time includes tracemalloc's overhead).
Prints a table and writes replay.md / replay.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_study.data.artefacts import ShardWriter, token_schema  # noqa: E402
from moe_study.io import write_json  # noqa: E402

SEQ_LEN, BATCH = 1024, 32

CHILD = r"""
import json, resource, sys, time, tracemalloc
from pathlib import Path
from stages import replay
from moe_study.io import write_json
from moe_study.data.shards import ReplayLoader
w = Path(sys.argv[1])
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t0 = time.perf_counter()
m = replay.build_replay("bench", w / "plan.json", w / "tokens", w / "split", w / "store")
t_build = time.perf_counter() - t0
heap_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
write_json(w / "replay.json", m)
rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
m2 = replay.build_replay("bench", w / "plan.json", w / "tokens", w / "split", w / "store")
t_reuse = time.perf_counter() - t0
t0 = time.perf_counter()
loader = ReplayLoader(w / "replay.json", int(sys.argv[2]))
n = 0
for b in loader:
    n += 1
t_load = time.perf_counter() - t0
print(json.dumps({"build_s": t_build, "reuse_s": t_reuse, "load_s": t_load, "batches": n,
                  "tokens_served": loader.tokens_served, "budget": m["budget_tokens"],
                  "epochs": m["n_epochs"],
                  "unique_docs": m["unique"]["docs"], "rss_build_mib": rss_build / 1024,
                  "rss_imports_mib": rss_imports / 1024,
                  "heap_peak_mib": heap_peak / 2**20,
                  "rss_total_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_inputs(w: Path, docs: int, unique: int, epochs: float) -> int:
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(5.3, 0.9, docs).astype(np.int64), 1, 20000)
    wr = ShardWriter(w / "tokens", "tokens", token_schema("uint16"))
    per = 50_000
    for a in range(0, docs, per):
        n = lens[a:a + per]
        flat = rng.integers(1, 8192, int(n.sum()), dtype=np.uint16)
        offs = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
        wr.write(pa.table({
            "doc": pa.array(np.arange(a, a + len(n)), pa.int64()),
            "id": [str(i) for i in range(a, a + len(n))],
            "source": ["bench"] * len(n),
            "n_bytes": pa.array(n * 4, pa.int64()),
            "tokens": pa.ListArray.from_arrays(pa.array(offs), pa.array(flat)),
        }))
    wr.finish(eos_id=0, dtype="uint16", vocab_size=8192)
    (w / "split").mkdir()
    split = np.where(np.arange(docs) % 50 == 0, "heldout", "train")
    pq.write_table(pa.table({"doc": pa.array(np.arange(docs), pa.int64()), "split": split}),
                   w / "split" / "split.parquet")
    write_json(w / "split" / "manifest.json", {"train_tokens": int(lens[split == "train"].sum())})
    steps = int(epochs * unique / (SEQ_LEN * BATCH))
    write_json(w / "plan.json", {"tokens": steps * SEQ_LEN * BATCH, "unique_tokens": unique,
                                 "arch": {"seq_len": SEQ_LEN}, "batch_size": BATCH, "steps": steps,
                                 "data_seed": 1})
    return int(lens.sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--unique", type=int, default=50_000_000)
    ap.add_argument("--epochs", type=float, default=3.5)
    ap.add_argument("--out", default="results/bench")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        t0 = time.perf_counter()
        corpus = make_inputs(w, a.docs, a.unique, a.epochs)
        t_gen = time.perf_counter() - t0
        env = {**os.environ, "NO_PROGRESS": "1", "LOGLEVEL": "WARNING"}
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run([sys.executable, "-c", CHILD, str(w), str(BATCH)], cwd=root, env=env,
                           capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        store_mib = sum(p.stat().st_size for p in (w / "store").rglob("*") if p.is_file()) / 2**20
    res.update(corpus_tokens=corpus, unique_tokens=a.unique, store_mib=store_mib, gen_s=t_gen,
               seq_len=SEQ_LEN, batch=BATCH,
               build_mtok_s=a.unique * (1 + res["epochs"]) / 1e6 / res["build_s"],
               load_mtok_s=res["tokens_served"] / 1e6 / res["load_s"])
    info = {"command": "python " + " ".join(sys.argv), "machine": platform.platform(),
            "python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)),
            "numpy": np.__version__, "pyarrow": pa.__version__,
            "max_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    rows = [
        ("corpus tokens / unique U", f"{corpus:,} / {a.unique:,} ({res['unique_docs']:,} docs)"),
        ("epochs built (seq_len, batch)", f"{res['epochs']} ({SEQ_LEN}, {BATCH})"),
        ("build: unique set + epochs", f"{res['build_s']:.1f} s ({res['build_mtok_s']:.0f} M tok/s written)"),
        ("re-run with everything cached (hash checks)", f"{res['reuse_s']:.1f} s"),
        ("peak RSS of the build (incl. touched memmap pages)",
         f"{res['rss_build_mib']:.0f} MiB ({res['rss_imports_mib']:.0f} MiB after imports)"),
        ("peak Python + numpy heap of the build (tracemalloc)", f"{res['heap_peak_mib']:.0f} MiB"),
        ("store size", f"{store_mib:.0f} MiB"),
        ("loader: full pass, sha-verified", f"{res['load_s']:.1f} s ({res['load_mtok_s']:.0f} M tok/s)"),
        ("tokens served / budget", f"{res['tokens_served']:,} / {res['budget']:,}"),
    ]
    head = f"`{info['command']}` on {info['machine']}, {info['cpus']} CPUs"
    md = ["# Replay store benchmark", "", head, "",
          "| measure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    print("\n".join(md))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.md").write_text("\n".join(md))
    write_json(out / "replay.json", {**info, "results": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
