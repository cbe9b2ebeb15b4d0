"""Several runs on one GPU, on a real GPU machine: the Snakemake packing of tests/test_gpu_packing.py
with real GPUs (moe_study/train/gpu_slots.py, README "Several runs on one GPU").

Builds a tiny study (the CI configuration, more runs, longer training) in a scratch copy of the project,
then runs its train and evaluate jobs twice: packed (`snakemake --config gpu_share=S --resources
gpu_slots=G*S`, G = the GPUs torch sees) and one job per GPU (share 1). Prints each packed job's GPU,
slot, wait and time span, the most jobs at once per GPU, both wall times, and whether the models of
the two builds are byte-identical (GPU kernels need not be deterministic: reported, not required).
Exit 1 if a GPU ever held more than S jobs or two overlapping jobs shared a slot.

    python bench/gpu_packing.py [--share 4] [--runs 8] [--compute-mult 50]   # needs snakemake; JSON to $OUT
    python bench/gpu_packing.py --fake 2 --share 2 --runs 4 --compute-mult 4  # the script itself, on CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from moe_study.hashing import sha256_tree  # noqa: E402
from moe_study.train import gpu_slots  # noqa: E402

IGNORE = shutil.ignore_patterns(".git", ".venv", "work", "results", ".snakemake", "__pycache__", "cache", ".dvc",
                                "shared", ".whl", "*.whl")


def study(runs: int, compute_mult: int, device: str) -> dict:
    from conftest import TINY

    p = copy.deepcopy(TINY)
    moe = TINY["runs"]["moe_r50"]
    p["runs"] = {(f"dense_s{i // 2}" if i % 2 == 0 else f"moe_r50_s{i // 2}"):
                 ({"kind": "dense"} if i % 2 == 0 else copy.deepcopy(moe)) | {"seed": 100 + i // 2}
                 for i in range(runs)}
    p["budget"]["compute"] *= compute_mult
    p["train"]["engine"] = "torch"
    p["train"]["device"] = device
    return p


def snakemake(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed in {cwd}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return time.perf_counter() - t0


def write_summary(summary: dict) -> None:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_packing.json").write_text(json.dumps(summary, indent=2))


def check_packed(items: list[dict], gpus: int, share: int, packed: Path, runs: int, compute_mult: int,
                 device: str) -> tuple[bool, dict]:
    """Print the packed build's claims (GPU, slot, wait, span); ok unless a GPU held more than `share` jobs
    or two overlapping jobs shared a slot."""
    t0 = min(s["claimed_at"] for s in items)
    print(f"\n{'job':24s} {'gpu':>3s} {'slot':>4s} {'wait s':>7s} {'start s':>8s} {'end s':>7s}")
    for s in sorted(items, key=lambda s: s["claimed_at"]):
        print(f"{s['label']:24s} {s['gpu']:3d} {s['slot']:4d} {s['wait_seconds']:7.1f} {s['claimed_at'] - t0:8.1f} "
              f"{s['end'] - t0:7.1f}")
    ok = True
    per_gpu = {}
    for g in range(gpus):
        on = [s for s in items if s["gpu"] == g]
        per_gpu[g] = gpu_slots.most_at_once(on)
        for x in on:
            for y in on:
                if x is not y and x["claimed_at"] < y["end"] and y["claimed_at"] < x["end"] and x["slot"] == y["slot"]:
                    print(f"ERROR: {x['label']} and {y['label']} overlap in slot {x['slot']} of GPU {g}")
                    ok = False
        ok &= per_gpu[g] <= share
    trains = [s for s in items if s["label"].startswith("train@")]
    most_trains = gpu_slots.most_at_once(trains)
    print(f"most jobs at once per GPU: {per_gpu} (share {share}); most train jobs at once: {most_trains}", flush=True)
    names = sorted(study(runs, compute_mult, device)["runs"])
    tps = {r: json.loads((packed / f"work/runs/{r}/train.json").read_text())["tokens_per_second"] for r in names}
    return ok, {"most_at_once_per_gpu": per_gpu, "most_train_at_once": most_trains, "tokens_per_second_packed": tps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=int, default=4)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--compute-mult", type=int, default=50, help="x the CI study's compute (longer training)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects (printed)")
    ap.add_argument("--no-compare", dest="compare", action="store_false",
                    help="skip the one-job-per-GPU build (the packed build's checks are made either way)")
    ap.add_argument("--fake", type=int, default=0, help="N fake GPUs on CPU (MOE_STUDY_FAKE_GPUS): check the script")
    a = ap.parse_args()

    import torch

    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_STUDY_")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "NO_PROGRESS": "1",
            "OMP_NUM_THREADS": "1"}
    if a.fake:
        gpus, name, device = a.fake, "fake GPU (CPU)", "auto"
        env[gpu_slots.ENV_FAKE] = str(a.fake)
    else:
        gpus, device = torch.cuda.device_count(), "cuda"  # CUDA_VISIBLE_DEVICES, if set, limits both
        if gpus == 0:
            sys.exit("no CUDA device: this check needs a GPU (or --fake N on CPU)")
        name = torch.cuda.get_device_name(0)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_packing-"))
    bin_dir = scratch / "bin"  # the jobs run `python -m stages...`: this interpreter, even where only python3 exists
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # not a symlink: keeps a venv
    (bin_dir / "python").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    packed = scratch / "packed"
    shutil.copytree(ROOT, packed, ignore=IGNORE)
    (packed / "params.yaml").write_text(yaml.safe_dump(study(a.runs, a.compute_mult, device), sort_keys=False))
    print(f"{gpus} x {name}; {a.runs} runs; share {a.share}; scratch {scratch}", flush=True)
    up = snakemake(["-c", str(a.cores), "--until", "replay", "tasks"], packed, env)
    print(f"shared inputs built in {up:.0f}s", flush=True)
    single = scratch / "share1"
    shutil.copytree(packed, single, symlinks=True)

    walls, claims = {}, {}
    builds = [("packed", packed, a.share)] + ([("share1", single, 1)] if a.compare else [])
    summary: dict = {"device": name, "gpus": gpus, "share": a.share, "runs": a.runs, "compute_mult": a.compute_mult}
    ok = True
    for label, where, share in builds:
        locks = scratch / f"locks-{label}"
        e = env | {gpu_slots.ENV_LOCK_DIR: str(locks)}
        walls[label] = snakemake(["-c", str(a.cores), "--config", f"gpu_share={share}", "--resources",
                                  f"gpu_slots={gpus * share}", "--until", "evaluate"], where, e)
        claims[label] = gpu_slots.held_spans(locks)
        print(f"{label}: train + evaluate of {a.runs} runs in {walls[label]:.1f}s", flush=True)
        if label == "packed":  # checked and written at once: the slower share-1 build may not finish in time
            ok, packed_summary = check_packed(claims["packed"], gpus, a.share, packed, a.runs, a.compute_mult, device)
            summary |= packed_summary | {"walls": walls, "claims": claims, "ok": ok}
            write_summary(summary)
    if a.compare:
        runs = sorted(study(a.runs, a.compute_mult, device)["runs"])
        same = {r: sha256_tree(packed / f"work/runs/{r}/model") == sha256_tree(single / f"work/runs/{r}/model")
                for r in runs}
        print(f"wall: packed {walls['packed']:.1f}s vs share 1 {walls['share1']:.1f}s "
              f"({walls['share1'] / walls['packed']:.2f}x); models byte-identical packed vs share 1: "
              f"{sum(same.values())}/{len(same)}")
        summary |= {"walls": walls, "claims": claims, "models_identical": same}
        write_summary(summary)
    if not a.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
