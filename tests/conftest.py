"""Shared fixtures: a throw-away copy of the project with a tiny params.yaml, for the engine tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# The tiny configuration CI replays: a synthetic corpus with planted duplicates, a 1-layer model,
# a few dozen steps per run. Small enough for both engines, end to end, in a few minutes.
TINY = {
    "study": "ci",
    "seed": 3,
    "corpus": {"sources": [{"kind": "synthetic", "docs": 400, "exact_dup_rate": 0.05, "near_dup_rate": 0.05}]},
    "tokenizer": {"vocab_size": 320, "docs_per_shard": 150},
    "dedupe": {"ngram": 4, "num_perm": 64, "bands": 16, "rows": 4, "threshold": 0.6},
    "split": {"heldout_fraction": 0.1},
    "budget": {"params": 30000, "compute": 6 * 30000 * 16 * 32 * 12, "unique_tokens": 6000},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32, "multiple_of": 2},
    "runs": {
        "dense": {"kind": "dense"},
        # attention is 14% of N here, so r_a = 0.5 within 2% needs top_k free (E=12, k=5)
        "moe_r50": {"kind": "moe", "activation_rate": 0.5, "top_k": 1, "vary": ["expert_width", "experts", "top_k"]},
    },
    "router": {"score": "softmax", "bias_balancing": False},
    "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 5, "threads": 1},
    "eval": {"batch_size": 16, "bootstrap": 100, "task_items": 64, "choice_words": 3},
    "export": {"enabled": False},  # export@run: a one-line record per run (tests/test_export.py exports)
}


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a clean clone (plus this change) holds."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    return [f for f in out if (ROOT / f).is_file() and not f.startswith("results/") and f != "dvc.lock"]


def make_project(dest: Path, params: dict) -> Path:
    for f in project_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.email=ci@example", "-c", "user.name=ci", "commit", "-qm", "tiny"], dest)
    return dest


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e["NO_PROGRESS"] = "1"
    e["DVC_NO_ANALYTICS"] = "1"  # no phoning home from CI
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture
def tiny_params() -> dict:
    import copy

    return copy.deepcopy(TINY)
