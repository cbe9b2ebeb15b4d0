"""2-GPU check: the train stage under its launcher (train.gpus: 2 -> torchrun) follows the 1-GPU run.

Two steps, because the GPU machine has no network and should only train:

    python bench/multi_gpu.py prepare DIR      # here, on CPU: corpus -> tokenize -> dedupe -> split -> plan -> replay
    python bench/multi_gpu.py run DIR --out results/perf/multi_gpu_h200x2.json   # there, on 2 GPUs

`run` trains, with the real stage command (`python -m stages.train --run R`), a dense and an MoE run
on 1 GPU (two seeds each: the seed-to-seed spread is the noise yardstick) and seed 0 again with
train.gpus: 2 (DeepSpeed ZeRO-1, bf16, the same global batch split over two processes), then
compares the final training loss (mean of the last 10% of steps) and the loss curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS: dict[str, Any] = {
    "study": "mgpu",
    "seed": 3,
    "corpus": {"sources": [{"kind": "synthetic", "docs": 4000}]},
    "tokenizer": {"vocab_size": 1024, "docs_per_shard": 1000},
    "dedupe": {"ngram": 4, "num_perm": 64, "bands": 16, "rows": 4, "threshold": 0.6},
    "split": {"heldout_fraction": 0.05},
    "budget": {"params": 4.0e6, "compute": 6 * 4.0e6 * 3.3e6, "unique_tokens": 300_000},
    "model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "seq_len": 256},
    "runs": {
        "dense_s0": {"kind": "dense", "seed": 0},
        "dense_s1": {"kind": "dense", "seed": 1},
        "moe_s0": {"kind": "moe", "activation_rate": 0.5, "top_k": 2, "seed": 0},
        "moe_s1": {"kind": "moe", "activation_rate": 0.5, "top_k": 2, "seed": 1},
    },
    # DeepSpeed on 1 GPU too (explicit since auto became the torch engine there: moe_study/train/speed.py)
    "train": {"batch_size": 32, "lr": 2e-3, "warmup_steps": 40, "log_every": 100, "dtype": "bf16",
              "checkpoint_every": 200, "engine": "deepspeed"},
}
UPSTREAM = ["corpus", "tokenize", "dedupe", "split"]
PER_RUN = ["plan", "replay"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    e |= {"NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    return e


def stage(d: Path, name: str, run: str | None = None, params: str = "params.yaml") -> None:
    cmd = [sys.executable, "-m", f"stages.{name}", *(["--run", run] if run else []), *(["--params", params]
                                                                                         if run else [])]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=d, env=env(), check=True)


def prepare(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    for name in UPSTREAM:
        stage(d, name)
    for run in PARAMS["runs"]:
        for name in PER_RUN:
            stage(d, name, run)


def train_in_copy(d: Path, tag: str, gpus: int, runs: list[str]) -> dict[str, Any]:
    """Train `runs` in a copy of d's work/ (so the 1- and 2-GPU outputs never overwrite each other)."""
    c = d.parent / f"{d.name}_{tag}"
    if c.exists():
        shutil.rmtree(c)
    shutil.copytree(d, c, symlinks=True)
    raw = yaml.safe_load((c / "params.yaml").read_text())
    raw["train"]["gpus"] = gpus
    (c / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out: dict[str, Any] = {}
    for run in runs:
        try:
            stage(c, "train", run)
        except subprocess.CalledProcessError as err:
            out[run] = {"failed": str(err)}
            continue
        res = json.loads((c / "work/runs" / run / "train.json").read_text())
        curve = pq.read_table(c / "work/runs" / run / "steps.parquet", columns=["loss"]).column("loss").to_pylist()
        out[run] = {"final_loss": res["final_train_loss"], "curve_every_50": curve[::50]} | {
            k: res[k] for k in ("steps", "engine", "processes", "device_name", "tokens_per_second", "mfu",
                                "wall_seconds", "resumed_from_step")}
    return out


def run(d: Path, out: Path) -> None:
    one = train_in_copy(d, "g1", 1, list(PARAMS["runs"]))
    two = train_in_copy(d, "g2", 2, ["dense_s0", "moe_s0"])
    rows = []
    for kind in ("dense", "moe"):
        a, b, s1 = one[f"{kind}_s0"], two[f"{kind}_s0"], one[f"{kind}_s1"]
        if any("failed" in x for x in (a, b, s1)):
            rows.append({"kind": kind, "failed": [x.get("failed") for x in (a, b, s1)]})
            continue
        curve_gap = max((abs(x - y) for x, y in zip(a["curve_every_50"][2:], b["curve_every_50"][2:], strict=False)),
                        default=0.0)
        rows.append({"kind": kind, "loss_1gpu": a["final_loss"], "loss_2gpu": b["final_loss"],
                     "gap_2gpu_vs_1gpu": abs(a["final_loss"] - b["final_loss"]),
                     "seed_spread_1gpu": abs(a["final_loss"] - s1["final_loss"]),
                     "max_curve_gap_every_50_steps": curve_gap,
                     "within_noise": abs(a["final_loss"] - b["final_loss"]) <= max(abs(a["final_loss"] -
                                                                                      s1["final_loss"]), 0.02),
                     "tokens_per_s_1gpu": a["tokens_per_second"], "tokens_per_s_2gpu": b["tokens_per_second"]})
    report = {"command": "python bench/multi_gpu.py " + " ".join(sys.argv[1:]), "one_gpu": one, "two_gpus": two,
              "comparison": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        print(json.dumps(r))
    dev = next((v["device_name"] for v in two.values() if "device_name" in v), "?")
    lines = [f"# 2 GPUs vs 1: the train stage under torchrun ({dev})", "",
             f"`{report['command']}` (data prepared on CPU with `python bench/multi_gpu.py prepare DIR`)", "",
             "| model | final loss 1 GPU | final loss 2 GPUs | gap | seed spread (1 GPU) | within noise | "
             "tokens/s 1 GPU | tokens/s 2 GPUs |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['kind']} | failed: {r['failed']} | | | | | | |")
            continue
        lines.append(f"| {r['kind']} | {r['loss_1gpu']:.4f} | {r['loss_2gpu']:.4f} | {r['gap_2gpu_vs_1gpu']:.4f} | "
                     f"{r['seed_spread_1gpu']:.4f} | {'yes' if r['within_noise'] else 'NO'} | "
                     f"{r['tokens_per_s_1gpu']:.0f} | {r['tokens_per_s_2gpu']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("multi_gpu.json"))
    a = ap.parse_args()
    if a.what == "prepare":
        prepare(a.dir.resolve())
    else:
        run(a.dir.resolve(), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
