"""Peak memory of each data stage (corpus, tokenize, dedupe, split) at 1x, 4x (and 8x) the default corpus.

Why: the data stages must stream (shard by shard, batch by batch), so their memory should stay
flat as the corpus grows; a stage that quietly loads everything would pass every test on the tiny
corpus and then fail on a real one. This runs each stage as `python -m stages.<name>` in its own
subprocess, in a throw-away project directory (its own `work/`), and records

- `maxrss_mb`: the child's peak resident set size from `os.wait4` (kernel `ru_maxrss`, exact), and
- `tree_peak_mb`: the peak of the summed RSS of the child and its descendants, sampled with psutil
  every 20 ms (catches helper processes such as dpkg in the corpus stage).

Nx corpus: params.yaml's own sources plus N-1 Parquet sources, each a copy of the 1x corpus with
changed ids (`copyK:<id>`, read through `id_field`, so the corpus stage's id-uniqueness check runs)
and row groups of 8192 rows. Every stage then reads N times the documents and bytes. The copies are exact
duplicates by text, so dedupe removes them (it still hashes, shingles and indexes N times the documents) and
split sees the 1x survivors plus Nx-sized token shards and dedupe tables; tokenize trains on Nx the
bytes (under the default 200 MB `train_max_bytes`) with the same word distribution. The import-only
floor of each stage's module is measured too, so the data-dependent part is visible.

    python bench/data_memory.py                  # 1x, 4x, 8x; writes results/bench/data_memory.{md,json}
    python bench/data_memory.py --scales 1,4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_study.data.artefacts import iter_shards, load_manifest  # noqa: E402

STAGES = ("corpus", "tokenize", "dedupe", "split")
ROW_GROUP = 8192  # rows per row group of the copies: readers hold one row group, keep it modest


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child may exit between listing and reading
            total += p.memory_info().rss
    return total


# Linux keeps ru_maxrss across fork + exec, so a stage forked straight from this (large) bench
# process would report at least the bench's own RSS. A tiny launcher execs first and forks the
# stage from itself, then reports the stage's own peak through wait4.
LAUNCH = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(ru.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def measure(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run `cmd`; return exit code, wall seconds, ru_maxrss and the sampled process-tree peak (MB)."""
    t0 = time.perf_counter()
    rss_file = log.with_suffix(".maxrss")
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-c", LAUNCH, str(rss_file), *cmd], cwd=cwd, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            try:
                proc = psutil.Process(p.pid)
                while not done.is_set():
                    peak[0] = max(peak[0], _tree_rss(proc))
                    time.sleep(0.02)
            except psutil.Error:
                pass

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, _ = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
    maxrss_kib = int(rss_file.read_text()) if rss_file.exists() else 0
    return {
        "rc": p.returncode,
        "wall_s": round(time.perf_counter() - t0, 2),
        "maxrss_mb": round(maxrss_kib / 1024, 1),  # Linux: KiB, of the stage process itself
        "tree_peak_mb": round(peak[0] / 2**20, 1),
    }


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NO_PROGRESS"] = "1"
    return env


def stage_cmd(stage: str) -> list[str]:
    cmd = [sys.executable, "-m", f"stages.{stage}", "--params", "params.yaml"]
    if stage == "corpus":
        cmd += ["--cache", str(ROOT / "data" / "cache")]  # the .debs already downloaded for the repo
    return cmd


def write_copies(corpus: Path, dest: Path, copies: int) -> list[dict]:
    """`copies` Parquet files (id, text) of the corpus with ids `copyK:<id>`; their sources entries."""
    dest.mkdir(parents=True, exist_ok=True)
    sources = []
    for k in range(1, copies + 1):
        path = dest / f"copy{k}.parquet"
        if not path.exists():
            writer = None
            for rb in iter_shards(corpus, columns=["id", "text"]):
                ids = pa.array([f"copy{k}:{i}" for i in rb.column(0).to_pylist()])
                t = pa.table({"id": ids, "text": rb.column(1)})
                writer = writer or pq.ParquetWriter(path, t.schema)
                writer.write_table(t, row_group_size=ROW_GROUP)
            writer.close()
        sources.append({"kind": "parquet", "path": str(path), "id_field": "id", "text_field": "text"})
    return sources


def project(dest: Path, params: dict) -> Path:
    dest.mkdir(parents=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def sizes(work: Path) -> dict:
    """What each stage produced: docs / bytes / tokens from the manifests."""
    out = {}
    for name in STAGES:
        m = work / "metrics" / f"{name}.json"
        if m.exists():
            d = json.loads(m.read_text())
            out[name] = {k: d[k] for k in ("docs", "bytes", "tokens") if k in d and isinstance(d[k], int)}
    with contextlib.suppress(Exception):  # informational only
        out["corpus_shards"] = len(load_manifest(work / "corpus")["shards"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--scales", default="1,4,8", help="corpus multiples to run (1 = params.yaml's corpus)")
    ap.add_argument("--out", default="results/bench/data_memory", help="writes OUT.md and OUT.json")
    ap.add_argument("--keep", action="store_true", help="keep the temp projects (path printed)")
    a = ap.parse_args(argv)
    scales = sorted({int(x) for x in a.scales.split(",")} | {1})
    base = yaml.safe_load((ROOT / a.params).read_text())
    env = child_env()
    tmp = Path(tempfile.mkdtemp(prefix="datamem-"))
    results: dict[str, dict] = {s: {} for s in STAGES}
    data: dict[str, dict] = {}
    try:
        floor = {s: measure([sys.executable, "-c", f"import stages.{s}"], tmp, env, tmp / f"import-{s}.log")
                 for s in STAGES}
        for x in scales:
            p = json.loads(json.dumps(base))
            if x > 1:  # the 1x corpus (built first) copied x - 1 times
                copies = write_copies(tmp / "x1" / "work" / "corpus", tmp / "copies", x - 1)
                p["corpus"]["sources"] = list(base["corpus"]["sources"]) + copies
            d = project(tmp / f"x{x}", p)
            for s in STAGES:
                r = measure(stage_cmd(s), d, env, tmp / f"{x}x-{s}.log")
                results[s][f"{x}x"] = r
                print(f"{x}x {s}: {r}", flush=True)
                if r["rc"]:
                    raise SystemExit(f"{x}x {s} failed:\n{(tmp / f'{x}x-{s}.log').read_text()[-3000:]}")
            data[f"{x}x"] = sizes(d / "work")
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    big = [f"{x}x" for x in scales if x > 1]
    for s in STAGES:
        r = results[s]
        r["import_floor_mb"] = floor[s]["maxrss_mb"]
        base_mb = r["1x"]["maxrss_mb"]
        r["growth"] = {k: round(r[k]["maxrss_mb"] / base_mb, 3) for k in big}
        r["growth_above_floor"] = {
            k: round((r[k]["maxrss_mb"] - r["import_floor_mb"]) / max(base_mb - r["import_floor_mb"], 1e-9), 3)
            for k in big
        }
    flat = all(results[s]["growth"].get("4x", 0) < 1.5 for s in STAGES) if "4x" in big else None
    result = {
        "command": "python bench/data_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu_cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(), "platform": platform.platform()},
        "scaling": "Nx = params sources + N-1 Parquet copies of the 1x corpus with ids copyK:<id>",
        "data": data,
        "stages": results,
        "flat_at_4x": flat,
        "criterion": "peak RSS at 4x < 1.5x peak RSS at 1x, every stage",
    }
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    sizes_txt = "; ".join(
        f"{k}: {v.get('corpus', {}).get('docs', '?')} docs, {v.get('corpus', {}).get('bytes', 0) / 1e6:.1f} MB, "
        f"{v.get('tokenize', {}).get('tokens', '?')} tokens" for k, v in data.items()
    )
    cols = ["1x", *big]
    lines = [
        f"# Peak memory of the data stages at {', '.join(cols)} data",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {result['machine']['cpu_cores']} cores, {result['machine']['memory_gb']} GB, "
        f"Python {result['machine']['python']}.",
        "1x = params.yaml's corpus; Nx = the same sources plus N-1 Parquet copies of the 1x corpus with new "
        f"ids ({sizes_txt}). The copies are exact duplicates, so dedupe removes them and split's survivors "
        "are ~1x, but dedupe and split still read Nx-sized token shards and tables.",
        "Each stage is `python -m stages.<name>` in its own subprocess in a temp project; peak RSS is the "
        "kernel's ru_maxrss of that process (os.wait4); the sampled process-tree peak (psutil, 20 ms) is in "
        "the JSON. Import floor = peak RSS of `python -c 'import stages.<name>'`; \"above floor\" is the "
        "growth of peak minus floor.",
        "",
        "| stage | import floor MB | " + " | ".join(f"{c} peak MB" for c in cols) + " | "
        + " | ".join(f"growth {c}" for c in big) + " | " + " | ".join(f"above floor {c}" for c in big)
        + " | " + " | ".join(f"{c} wall s" for c in cols) + " |",
        "|---|" + "---:|" * (1 + len(cols) * 2 + len(big) * 2),
    ]
    for s in STAGES:
        r = results[s]
        lines.append(
            f"| {s} | {r['import_floor_mb']:.0f} | " + " | ".join(f"{r[c]['maxrss_mb']:.0f}" for c in cols)
            + " | " + " | ".join(f"{r['growth'][c]:.2f}x" for c in big)
            + " | " + " | ".join(f"{r['growth_above_floor'][c]:.2f}x" for c in big)
            + " | " + " | ".join(f"{r[c]['wall_s']:.1f}" for c in cols) + " |"
        )
    verdict = "n/a (no 4x run)" if flat is None else ("yes" if flat else "no")
    lines += [
        "",
        f"Flat (every stage < 1.5x peak RSS at 4x data): **{verdict}**.",
        "",
        "Caveat: copies add documents and bytes but no new words. Memory that grows with *distinct* "
        "content, such as the BPE trainer's word and pair tables (bounded by "
        "`tokenizer.train_max_bytes`), is under-exercised; tokenize's encoding phase is bounded by "
        "`batch_docs` and `docs_per_shard` regardless of content.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
