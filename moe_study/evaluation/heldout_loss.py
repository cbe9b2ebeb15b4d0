"""Held-out loss and bits per byte of one trained run (stage `evaluate`), with a bootstrap interval.

Held-out documents are the rows of work/split/split.parquet with split == "heldout"; their tokens
come from the token shards. Each document is scored on its own as `EOS d EOS`: the model predicts
every token of d and the closing EOS (len(d) + 1 predictions) from the opening EOS on, so the
loss includes knowing where the document ends, and no run can profit from context of another
document. Documents longer than seq_len are cut into consecutive windows of seq_len predictions;
a window starts with no context from the previous one (a slight pessimism on long documents, the
same for every run).

Metrics: mean loss per predicted token (nats), perplexity exp(loss), and bits per byte
bpb = total nats / ln 2 / total bytes of the scored documents, which compares models
whatever their tokenizer. The closing EOS is counted on both sides: its prediction is in the nats,
and it counts as one byte (the document separator) beside each document's UTF-8 bytes, so `bytes`
= UTF-8 bytes + docs (EOS_BYTES). The 95% intervals resample documents with replacement
(`eval.bootstrap` times, seeded by `eval.seed`): documents, not tokens, are the independent units.
With `eval.max_tokens`, a seeded random subset of whole documents is scored (the same subset for
every run, since it depends only on the held-out set and the seed), stopping before the cap.

Zero-shot tasks (stages/tasks.py: sentence-final-word cloze and 4-way continuation choice, built
once from the same held-out documents by the tasks stage) are scored under `tasks` with Wilson 95%
intervals; `eval.task_items: 0` turns them off (`tasks` is then null).

The validation split (work/split/split.parquet rows with split == "validation"; the learning-rate choice of
the aggregate, never reported as the test figure) is scored the same way under `validation` (loss, bpb,
tokens, bytes, docs; null when the split has none). Per-document scores of both splits go to
work/eval/<run>.docs.parquet (split, doc, nats, tokens, bytes): every run scores the same documents,
so the aggregate can pair them (a paired bootstrap of a difference between runs).

The output work/eval/<run>.json holds `loss`, `bpb`, `perplexity`, their 95% intervals `loss_ci`
and `bpb_ci` (null when eval.bootstrap is 0), `tasks`, the scored `tokens`/`bytes`/`docs`, and under `plan`
the run's key figures (arch, N, N_active, r_a, training tokens, epochs, compute), so the aggregate
stage needs nothing else.

Device: CUDA when visible, else CPU; always float32 (scoring is cheap next to training, and
float32 keeps the figures comparable across machines).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_study.config.schema import EvalConfig, Params
from moe_study.data.artefacts import load_manifest
from moe_study.data.heldout import HeldoutDoc, load_heldout
from moe_study.evaluation.scoring import score_requests
from moe_study.evaluation.tasks import evaluate_tasks
from moe_study.hashing import sha256_file, sha256_tree
from moe_study.io import WORK, read_json, write_json
from moe_study.model.lm import LM, load_model
from moe_study.provenance import provenance
from moe_study.train import gpu_slots

PLAN_KEYS = ("arch", "nonvocab_params", "nonvocab_active", "activation_rate", "tokens", "steps", "epochs",
             "unique_tokens", "compute", "compute_used", "batch_size", "tokens_per_step", "data_seed")

log = logging.getLogger("stages.evaluate")
EOS_BYTES = 1  # the closing EOS of each document counts as one byte, as its prediction counts in the nats
DOC_COLUMNS = ("split", "doc", "nats", "tokens", "bytes")


class EvalError(ValueError):
    """Inputs that cannot be evaluated (the message names the file or field)."""


def load_validation(tokens_dir: Path, split_path: Path) -> list[HeldoutDoc]:
    """The validation split's docs; none when the split has no validation side (split.validation_fraction 0)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    side = pq.read_table(split_path, columns=["split"]).column("split")
    if not pc.any(pc.equal(side, "validation")).as_py():
        return []
    return load_heldout(tokens_dir, split_path, side="validation")


def select_docs(docs: list[HeldoutDoc], max_tokens: int | None, seed: int) -> tuple[list[HeldoutDoc], int]:
    """Drop empty docs; under a cap, take whole docs of a seeded order until the next would exceed it.

    Returns (docs to score, number of empty docs skipped). Each doc costs len(tokens) + 1 predictions.
    """
    nonempty = [d for d in docs if len(d.tokens) > 0]
    skipped = len(docs) - len(nonempty)
    if max_tokens is None:
        return nonempty, skipped
    order = np.random.default_rng(seed).permutation(len(nonempty))
    chosen, total = [], 0
    for i in order.tolist():
        cost = len(nonempty[i].tokens) + 1
        if total + cost > max_tokens:
            break
        chosen.append(nonempty[i])
        total += cost
    if not chosen:
        raise EvalError(f"eval.max_tokens={max_tokens} is below the first held-out document's "
                        f"{len(nonempty[order[0]].tokens) + 1} predictions")
    chosen.sort(key=lambda d: d.doc)
    return chosen, skipped


def windows(tokens: np.ndarray, eos_id: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) windows of at most seq_len predictions covering EOS + tokens + EOS."""
    seq = np.concatenate([[eos_id], tokens, [eos_id]]).astype(np.int64)
    out = []
    for start in range(0, len(seq) - 1, seq_len):
        inp = seq[start:start + seq_len]
        tgt = seq[start + 1:start + seq_len + 1]
        out.append((inp[:len(tgt)], tgt))
    return out


# ---------------------------------------------------------------------------------------- scoring
def score_docs(model: LM, docs: list[HeldoutDoc], eos_id: int, batch_size: int,
               device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (summed nats, predicted tokens), float64/int64, in the order of `docs`.

    Every window of every document is one request of the shared loop (moe_study.evaluation.scoring),
    all its predictions targets; a document's nats are its windows' sums added in window order.
    """
    doc_of: list[int] = []
    requests: list[tuple[np.ndarray, int]] = []
    for i, d in enumerate(docs):
        for inp, tgt in windows(d.tokens, eos_id, model.arch.seq_len):
            doc_of.append(i)
            requests.append((np.append(inp, tgt[-1]), len(tgt)))
    scores = score_requests(model, requests, eos_id, batch_size, device, desc="evaluate")
    nats = np.zeros(len(docs), dtype=np.float64)
    count = np.zeros(len(docs), dtype=np.int64)
    np.add.at(nats, doc_of, -scores.logprob)  # in window order: the order the sums were always added in
    np.add.at(count, doc_of, scores.count)
    return nats, count


def summary(nats: np.ndarray, count: np.ndarray, n_bytes: np.ndarray) -> dict[str, float]:
    """`tokens`/`bytes` are the scored held-out predictions and UTF-8 bytes (not training tokens)."""
    total_nats, total_tokens, total_bytes = float(nats.sum()), int(count.sum()), int(n_bytes.sum())
    loss = total_nats / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": total_nats / math.log(2) / total_bytes,
            "tokens": total_tokens, "bytes": total_bytes, "nats": total_nats}


def bootstrap(nats: np.ndarray, count: np.ndarray, n_bytes: np.ndarray, resamples: int,
              seed: int) -> dict[str, Any] | None:
    """95% percentile intervals of loss and bpb, resampling documents with replacement.

    Hand-written rather than scipy.stats.bootstrap on purpose: given the same Generator, scipy
    (paired, method="percentile") draws the same resamples, but its vectorised sums, percentile and
    standard error differ from these in the last bit, so every committed interval would move by an
    ulp; it would also need one pass per statistic or a vector-valued one. Loss and bpb share each
    resample here, and the numbers stay those of every earlier run.
    """
    if resamples == 0:
        return None
    rng = np.random.default_rng(seed)
    n = len(nats)
    loss = np.empty(resamples)
    bpb = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, n, size=n)
        s = nats[idx].sum()
        loss[r] = s / count[idx].sum()
        bpb[r] = s / math.log(2) / n_bytes[idx].sum()
    return {"resamples": resamples, "seed": seed, "level": 0.95,
            "loss": [float(np.percentile(loss, 2.5)), float(np.percentile(loss, 97.5))],
            "bpb": [float(np.percentile(bpb, 2.5)), float(np.percentile(bpb, 97.5))],
            "loss_se": float(loss.std(ddof=1)) if resamples > 1 else None,
            "bpb_se": float(bpb.std(ddof=1)) if resamples > 1 else None}


def evaluate_model(model: LM, docs: list[HeldoutDoc], eos_id: int, cfg: EvalConfig,
                   device: torch.device) -> dict[str, Any]:
    """Score the selected docs and return the metrics (no files)."""
    nats, count = score_docs(model, docs, eos_id, cfg.batch_size, device)
    n_bytes = np.array([d.n_bytes + EOS_BYTES for d in docs], dtype=np.int64)
    if n_bytes.sum() <= 0:
        raise EvalError("the scored held-out documents have 0 bytes in total (n_bytes column)")
    out = summary(nats, count, n_bytes)
    out["docs"] = len(docs)
    ci = bootstrap(nats, count, n_bytes, cfg.bootstrap, cfg.seed)
    out["bootstrap"] = ci
    out["loss_ci"] = ci["loss"] if ci else None  # null when eval.bootstrap = 0
    out["bpb_ci"] = ci["bpb"] if ci else None
    out["per_doc"] = {"doc": np.array([d.doc for d in docs], dtype=np.int64), "nats": nats, "tokens": count,
                      "bytes": n_bytes}  # not in the JSON: run_evaluate writes it to <run>.docs.parquet
    return out


def write_doc_scores(path: Path, per_split: dict[str, dict[str, np.ndarray]]) -> None:
    """<run>.docs.parquet: one row per scored document and split (DOC_COLUMNS), split then doc order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_study.io import atomic_path

    cols: dict[str, list] = {c: [] for c in DOC_COLUMNS}
    for side, d in per_split.items():
        cols["split"] += [side] * len(d["doc"])
        for c in DOC_COLUMNS[1:]:
            cols[c] += d[c].tolist()
    table = pa.table({"split": pa.array(cols["split"], pa.string()), "doc": pa.array(cols["doc"], pa.int64()),
                      "nats": pa.array(cols["nats"], pa.float64()), "tokens": pa.array(cols["tokens"], pa.int64()),
                      "bytes": pa.array(cols["bytes"], pa.int64())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


# ----------------------------------------------------------------------------------------- stage
def run_evaluate(p: Params, run: str, work: Path = WORK, out_dir: Path | None = None) -> dict[str, Any]:
    """The stage: load model and held-out docs, score, write work/eval/<run>.json."""
    p.run(run)
    cfg = p.eval
    rdir = work / "runs" / run
    model_dir, plan_path = rdir / "model", rdir / "plan.json"
    tokens_dir, split_path = work / "tokens", work / "split" / "split.parquet"
    plan = read_json(plan_path)
    missing = [k for k in PLAN_KEYS if k not in plan]
    if missing:
        raise EvalError(f"{plan_path}: missing key(s) {missing} (re-run the plan stage)")
    manifest = load_manifest(tokens_dir)
    torch.set_num_threads(gpu_slots.cpu_threads())  # a packed GPU job: its share of the cores
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_model(model_dir, device=device)
    if config["arch"] != plan.get("arch"):
        raise EvalError(f"{model_dir}/config.json arch differs from {plan_path} (re-run train)")
    eos_id = int(config.get("eos_id", manifest.get("eos_id", -1)))
    if "eos_id" in manifest and int(manifest["eos_id"]) != eos_id:
        raise EvalError(f"{model_dir}: trained with eos_id {eos_id}, {tokens_dir}/manifest.json says "
                        f"{manifest['eos_id']} (re-run train)")
    if "vocab_size" in manifest and int(manifest["vocab_size"]) != model.vocab_size:
        raise EvalError(f"{model_dir}: vocab {model.vocab_size}, tokens manifest says "
                        f"{manifest['vocab_size']} (re-run train)")
    all_docs = load_heldout(tokens_dir, split_path)
    docs, empty = select_docs(all_docs, cfg.max_tokens, cfg.seed)
    log.info("%s: scoring %d of %d held-out docs (%d empty skipped) on %s", run, len(docs), len(all_docs),
             empty, device)
    metrics = evaluate_model(model, docs, eos_id, cfg, device)
    per_split = {"heldout": metrics.pop("per_doc")}
    val_docs = [d for d in load_validation(tokens_dir, split_path) if len(d.tokens) > 0]
    if val_docs:
        v = evaluate_model(model, val_docs, eos_id, EvalConfig(**{**cfg.model_dump(), "bootstrap": 0}), device)
        per_split["validation"] = v.pop("per_doc")
        metrics["validation"] = {k: v[k] for k in ("loss", "bpb", "tokens", "bytes", "docs")}
        log.info("%s: validation loss %.4f, bpb %.4f over %d docs", run, v["loss"], v["bpb"], v["docs"])
    else:
        metrics["validation"] = None
    inputs = {"model": sha256_tree(model_dir), "plan": sha256_file(plan_path), "tokens": manifest["sha256"],
              "split": sha256_file(split_path)}
    if cfg.task_items > 0:
        tasks_dir = work / "tasks"
        tasks_manifest = tasks_dir / "manifest.json"
        if not tasks_manifest.exists():
            raise EvalError(f"{tasks_manifest}: missing (run the tasks stage, or set eval.task_items: 0)")
        inputs["tasks"] = sha256_file(tasks_manifest)
        metrics["tasks"] = evaluate_tasks(model, tasks_dir, eos_id, cfg.batch_size, device)
        log.info("%s: %s", run, ", ".join(f"{k} acc {v['acc']:.4f} of {v['items']}" for k, v in
                                         metrics["tasks"].items() if v["items"]))
    else:
        metrics["tasks"] = None
    result = {
        "run": run,
        "kind": plan["arch"]["kind"],
        "plan": {k: plan[k] for k in PLAN_KEYS},
        **metrics,
        "heldout_docs": len(all_docs),
        "heldout_docs_empty_skipped": empty,
        "max_tokens": cfg.max_tokens,
        "scoring": "each doc alone as EOS+doc+EOS, windows of seq_len without cross-window context; "
                   "bytes = UTF-8 bytes + 1 per doc for the closing EOS",
        "device": str(device),
        "provenance": provenance("evaluate", inputs, {"eval": cfg.model_dump(), "run": run}),
    }
    claim = gpu_slots.current()
    if claim is not None:  # only then (several runs on one GPU): the GPU and slot it ran on
        result["gpu_claim"] = claim.record()
    write_doc_scores((out_dir or work / "eval") / f"{run}.docs.parquet", per_split)
    write_json((out_dir or work / "eval") / f"{run}.json", result)
    ci = metrics["bootstrap"]
    log.info("%s: loss %.4f nats/token, bpb %.4f%s over %d tokens / %d bytes", run, metrics["loss"],
             metrics["bpb"], f" [{ci['bpb'][0]:.4f}, {ci['bpb'][1]:.4f}]" if ci else "",
             metrics["tokens"], metrics["bytes"])
    return result
