"""Several runs on one GPU through DVC's queue, on a real GPU machine: tests/test_dvc_exp.py's
`test_dvc_exp_queue_and_run_all` with a real GPU instead of a fake one (README "Several runs on one GPU").

Builds a tiny CUDA study (bench/gpu_packing.py's, eager: compile and CUDA graphs off, since speed is not
the question) in a scratch git repository, runs its baseline with `dvc repro`, queues two experiments
(`dvc exp run --queue -S ++runs.<moe run>.lr=...`) and runs them at once (`dvc exp run --run-all -j 2`)
with MOE_STUDY_GPU_SHARE=2. Checks, from the GPU-slot journal (moe_study/train/gpu_slots.py) and `dvc exp
show`: both experiments succeeded with their own results, their train jobs held GPU 0 at the same time,
each in its own slot, never more than 2 jobs at once. Writes gpu_dvc_queue.json to $OUT (or --out);
exit 1 if a check fails.

    python bench/gpu_dvc_queue.py [--compute-mult 20]        # needs git, a GPU and dvc with its queue
    python bench/gpu_dvc_queue.py --fake 1 --compute-mult 4  # the script itself, on CPU (fake GPU)

On a lent GPU machine, dvc and its queue travel as wheels: `tools/gpu/wheelhouse.py --dvc-queue`.
"""

from __future__ import annotations

import argparse
import csv
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
sys.path.insert(0, str(ROOT / "bench"))

from gpu_packing import study  # noqa: E402

from moe_study.train import gpu_slots  # noqa: E402

IGNORE = shutil.ignore_patterns(".git", ".venv", "work", "results", ".snakemake", "__pycache__", "cache", "tmp",
                                "shared", ".whl*", "*.whl", ".gpu_*")
LRS = ("0.005", "0.004")


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1200) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r.stdout + r.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compute-mult", type=int, default=20, help="training length: x the CI configuration's")
    ap.add_argument("--fake", type=int, default=None, help="fake GPUs (CPU check of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args(argv)
    if shutil.which("git") is None:
        sys.exit("error: no git on this machine (`dvc exp` keeps experiments as git refs)")
    work = Path(tempfile.mkdtemp(prefix="gpu_dvc_queue_")) / "proj"
    shutil.copytree(ROOT, work, ignore=IGNORE, symlinks=True)
    p = study(2, a.compute_mult, "cpu" if a.fake else "cuda")
    p["train"] |= {"compile": False, "cuda_graph": False}
    moe = next(r for r in p["runs"] if r.startswith("moe"))
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    locks = work.parent / "locks"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_STUDY_")}
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(work), env.get("PYTHONPATH")])),
            "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example", "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@example"}
    git = ["git", "-c", "commit.gpgsign=false"]
    sh([*git, "init", "-q"], work, env)
    sh([*git, "add", "-A"], work, env)
    sh([*git, "commit", "-qm", "tiny CUDA study"], work, env)
    t0 = time.perf_counter()
    sh(["dvc", "repro"], work, env)  # the baseline, one job at a time
    baseline_s = time.perf_counter() - t0
    sh([*git, "add", "-A"], work, env)
    sh([*git, "commit", "-qm", "baseline"], work, env)
    for lr in LRS:
        sh(["dvc", "exp", "run", "--queue", "-S", f"++runs.{moe}.lr={lr}"], work, env)
    packed = env | {gpu_slots.ENV_SHARE: "2", gpu_slots.ENV_LOCK_DIR: str(locks)}
    if a.fake:
        packed[gpu_slots.ENV_FAKE] = str(a.fake)
    t0 = time.perf_counter()
    sh(["dvc", "exp", "run", "--run-all", "-j", "2"], work, packed, timeout=3600)
    queue_s = time.perf_counter() - t0
    rows = list(csv.DictReader(sh(["dvc", "exp", "show", "--csv", "--drop", r"work/.*|stages/.*|data/.*|kernels"],
                                  work, env).splitlines()))
    key = f"runs.{moe}.lr"
    queued = [r for r in rows if r.get(f"params.yaml:{key}", r.get(key)) in LRS]

    spans = gpu_slots.held_spans(locks)
    trains = [s for s in spans if s["label"] == f"train@{moe}"]
    checks = {
        "two experiments succeeded": len(queued) == 2 and all(r["State"] == "Success" for r in queued),
        "each its own result": len({r[f"{moe}.val_bpb"] for r in queued}) == 2,
        "two train jobs, share 2": len(trains) == 2 and all(s["share"] == 2 for s in trains),
        "at once": gpu_slots.most_at_once(trains) == 2,
        "own slots": len({s["slot"] for s in trains}) == 2,
        "at most 2 per GPU": all(gpu_slots.most_at_once([s for s in spans if s["gpu"] == g]) <= 2
                                 for g in {s["gpu"] for s in spans}),
    }
    report = {"checks": checks, "ok": all(checks.values()), "baseline_s": round(baseline_s, 1),
              "queue_s": round(queue_s, 1), "fake": a.fake, "compute_mult": a.compute_mult,
              "spans": [{k: s[k] for k in ("label", "gpu", "device", "slot", "share", "claimed_at", "end", "fake")}
                        for s in spans],
              "experiments": [{k: r.get(k) for k in ("Experiment", "State", f"{moe}.val_bpb")} for r in queued]}
    print(json.dumps(report, indent=2))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "gpu_dvc_queue.json").write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
