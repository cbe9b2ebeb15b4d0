"""The epoch-replay data plan of one run (which epochs, how much of each), as a manifest.

The run's plan gives its token budget T, the shared unique-token budget U, seq_len and the data
seed. This stage makes sure the content-addressed store (moe_study/data/shards.py) holds the unique set
and the ceil(T / tokens-per-epoch) epoch files the run reads, building only what is missing or
corrupt (a longer run reuses a shorter run's epochs; runs with the same data plan share all of
them), and writes `work/runs/<run>/replay.json`: the only DVC output. The loader reads that
manifest, and can rebuild any store file from the inputs it records.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moe_study.cli import setup_logging
from moe_study.config.schema import Params
from moe_study.data.shards import (
    FORMAT,
    ReplayError,
    UniqueSpec,
    ensure_epoch,
    ensure_unique_set,
    epoch_paths,
    epoch_usage,
    sequences_per_epoch,
    tokens_meta,
)
from moe_study.hashing import sha256_file
from moe_study.io import WORK, read_json, write_json
from moe_study.provenance import provenance

TOKENS_DIR = WORK / "tokens"
SPLIT_DIR = WORK / "split"
STORE_ROOT = WORK / "store" / "replay"


def replay_path(run: str) -> Path:
    return WORK / "runs" / run / "replay.json"


def _plan_fields(plan_path: Path) -> dict[str, int]:
    """The plan fields the replay uses, each checked (a missing one names the key and the file)."""
    plan = read_json(plan_path)
    try:
        out = {
            "tokens": plan["tokens"],
            "unique_tokens": plan["unique_tokens"],
            "seq_len": plan["arch"]["seq_len"],
            "batch_size": plan["batch_size"],
            "steps": plan["steps"],
            "data_seed": plan["data_seed"],
            "order_seed": plan.get("order_seed", 0),  # plans before train.vary_data_order: today's order
        }
    except (KeyError, TypeError) as err:
        raise ReplayError(f"{plan_path}: missing key {err} (re-run the plan stage)") from None
    for k, v in out.items():
        if not isinstance(v, int) or isinstance(v, bool) or (k not in ("data_seed", "order_seed") and v <= 0):
            raise ReplayError(f"{plan_path}: {k}={v!r} must be a positive integer")
    return out


def check_fits(sequences: int, per_epoch: int, epoch_bytes: int, store: Path) -> None:
    """Refuse a plan whose epoch files cannot fit on the store's disk, before building any of them.

    Why: planning a paper-scale budget is fine (plan, plan_table), but replaying an absurd one
    (`budget.compute` far above what `budget.unique_tokens` can feed) used to end in a MemoryError
    deep in the epoch list, or a full disk hours later. Epochs already in the store count as free.
    """
    if per_epoch <= 0:
        return  # epoch_usage says what is wrong
    epochs = -(-sequences // per_epoch)
    need = epochs * epoch_bytes - sum(p.stat().st_size for p in store.glob("*") if p.is_file())
    free = shutil.disk_usage(store).free
    if need > free:
        raise ReplayError(
            f"budget.compute: this run replays {epochs:,} epochs of budget.unique_tokens "
            f"({epoch_bytes / 1e6:.1f} MB each, {need / 1e9:,.1f} GB to write) but {store} has {free / 1e9:,.1f} GB "
            "free; lower budget.compute or raise budget.unique_tokens (planning alone: stages.plan_table)")


def build_replay(
    run: str,
    plan_path: Path | str,
    tokens_dir: Path | str = TOKENS_DIR,
    split_dir: Path | str = SPLIT_DIR,
    store_root: Path | str = STORE_ROOT,
) -> dict[str, Any]:
    """Ensure the run's epochs are in the store and return its replay manifest (not yet written)."""
    log = setup_logging("replay")
    plan_path, split_dir = Path(plan_path), Path(split_dir)
    plan = _plan_fields(plan_path)
    split_path, split_manifest = split_dir / "split.parquet", split_dir / "manifest.json"
    if not split_manifest.exists():
        raise ReplayError(f"{split_manifest}: missing (run the split stage first)")
    tm = tokens_meta(tokens_dir)
    spec = UniqueSpec.from_inputs(tokens_dir, split_path, plan["unique_tokens"], plan["data_seed"],
                                  plan["order_seed"])
    u = ensure_unique_set(store_root, spec)

    seq_len = plan["seq_len"]
    per_epoch = sequences_per_epoch(u.stream_tokens, seq_len)
    needed = math.ceil(plan["tokens"] / seq_len)
    check_fits(needed, per_epoch, u.stream_tokens * np.dtype(spec.dtype).itemsize, Path(u.dir))
    usage = epoch_usage(needed, per_epoch)
    epochs = []
    for e, used in enumerate(usage):
        info, built = ensure_epoch(u, e)
        log.info("epoch %d: %s (%d of %d sequences used)", e, "built" if built else "reused", used, per_epoch)
        epochs.append({
            "epoch": e,
            "seed": info["seed"],
            "path": str(epoch_paths(u.dir, e)[0]),
            "tokens": info["tokens"],
            "sequences_total": per_epoch,
            "sequences_used": used,
            "sha256": info["sha256"],
        })
    served = sum(usage) * seq_len
    inputs = {
        "tokens": tm["sha256"],
        "split": sha256_file(split_path),
        "train_docs": spec.train_sha256,
        "split_manifest": sha256_file(split_manifest),
        "plan": sha256_file(plan_path),
    }
    unique = {k: u.meta[k] for k in ("docs", "tokens", "train_docs", "train_docs_empty_skipped",
                                     "train_tokens_available", "last_doc", "sha256")}
    manifest = {
        "format": FORMAT,
        "run": run,
        "store": {"dir": str(u.dir), "key": spec.key},
        "unique": {"spec": spec.to_dict(), "requested": plan["unique_tokens"], **unique},
        "seq_len": seq_len,
        "dtype": spec.dtype,
        "eos_id": spec.eos_id,
        "vocab_size": tm["vocab_size"],
        "data_seed": plan["data_seed"],
        "order_seed": plan["order_seed"],
        "layout": "per epoch: EOS d0 EOS d1 ... ; sequence i = stream[i*seq_len : i*seq_len + seq_len + 1]",
        "stream_tokens_per_epoch": u.stream_tokens,
        "sequences_per_epoch": per_epoch,
        "epochs": epochs,
        "n_epochs": len(epochs),
        # passes over the unique stream actually served (issue 14: was tokens / U without the EOS)
        "epochs_fraction": sum(usage) / per_epoch,
        "sequences": sum(usage),
        "tokens_served": served,
        "budget_tokens": plan["tokens"],
        "batch_size": plan["batch_size"],
        "steps": plan["steps"],
        "provenance": provenance("replay", inputs, {"plan": plan}),
    }
    if abs(served - plan["tokens"]) >= seq_len:
        raise ReplayError(f"internal: {served} tokens served for a budget of {plan['tokens']}")
    log.info("%s: U=%d in %d docs, %d epochs (%.3f passes), %d sequences, %d tokens served (budget %d)",
             run, u.n_tokens, u.n_docs, len(epochs), sum(usage) / per_epoch, sum(usage), served, plan["tokens"])
    return manifest


def write_replay(p: Params, run: str) -> None:
    """The data plan is in plan.json; params.yaml is only validated (by per_run_main)."""
    out = replay_path(run)
    write_json(out, build_replay(run, out.with_name("plan.json")))
