"""One run's plan, training record and evaluation as Parquet rows for the study database.

Why a stage per run: aggregation is incremental. Adding or re-running one run re-collects that run
only; the aggregate stage unions the per-run files with DuckDB (`read_parquet`), so its own work is
a union, whatever the number of runs.

Inputs: work/runs/<run>/plan.json, train.json (with `audit` when the trainer writes one: plan vs
model/loader/FLOP counter), the training curve steps.parquet (moe_study/train/trainlog.py) and
work/eval/<run>.json. Every key of those files that the rows need is required (REQUIRED_KEYS): a
file that lacks one is an error naming the file and the key, not a silent default. Outputs in
work/collect/<run>/:
- `run.parquet`: one row of the `runs` table (RUN_COLUMNS);
- `steps.parquet`: the training curve (STEPS_TABLE_COLUMNS: run_id, study and the trainer's STEP_COLUMNS;
  a column the trainer did not log is null);
- `expert_load.parquet`: MoE only, the fraction of routed slots per layer and expert over training;
- `docs.parquet`: the per-document scores of evaluate (work/eval/<run>.docs.parquet: split, doc, nats,
  tokens, bytes) with the run id (DOC_COLUMNS), for the aggregate's paired bootstrap; empty, with a
  warning, for an evaluation that predates them (its differences then get no paired interval).

`validation_loss` / `validation_bpb` are the validation split's scores (learning-rate choice only; null
without a validation split); `val_loss` / `val_bpb` stay the held-out test figures.

`train_flops` is the plan's training FLOPs per token (in the budget's `compute_convention`; 6 N_active
for plans that predate conventions) times the tokens the loader served (train.json): what the study
equalises, C up to whole steps. `train_flops_exact` is the exact count (every matmul, the LM head and
attention scores included: accounting.exact_train_flops) times the same tokens, the run's real compute
whatever the convention (equal to `train_flops` under `exact`). `audit_*` are the relative
deviations the trainer's audit measured (null without an audit). `params_sha256` hashes the
params hashes of plan, train and evaluate provenance: two runs share it only when every setting
that made them is the same.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moe_study.accounting import exact_train_flops, unique_passes
from moe_study.config.schema import Params
from moe_study.hashing import sha256_file, sha256_json
from moe_study.io import WORK, atomic_path, read_json
from moe_study.train.trainlog import STEP_COLUMNS

log = logging.getLogger("stages.collect")

RUN_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("run_id", pa.string()), ("study", pa.string()), ("grp", pa.string()), ("kind", pa.string()),
    ("seed", pa.int64()), ("lr", pa.float64()),
    ("size", pa.float64()),  # the budget's target N: runs of one size are compared
    ("total_params", pa.int64()), ("active_params", pa.int64()), ("activation_rate", pa.float64()),
    ("experts", pa.int64()), ("top_k", pa.int64()), ("shared_experts", pa.int64()), ("ffn_hidden", pa.int64()),
    ("compute_budget", pa.float64()), ("compute_convention", pa.string()), ("train_flops", pa.float64()),
    ("tokens_seen", pa.int64()),
    ("unique_tokens", pa.int64()), ("epochs", pa.float64()), ("steps", pa.int64()),
    ("final_train_loss", pa.float64()),
    ("val_loss", pa.float64()), ("val_loss_lo", pa.float64()), ("val_loss_hi", pa.float64()),
    ("val_ppl", pa.float64()), ("val_bpb", pa.float64()), ("val_bpb_lo", pa.float64()), ("val_bpb_hi", pa.float64()),
    ("eval_tokens", pa.int64()), ("eval_bytes", pa.int64()), ("eval_docs", pa.int64()),
    ("validation_loss", pa.float64()), ("validation_bpb", pa.float64()),
    ("cloze_acc", pa.float64()), ("cloze_lo", pa.float64()), ("cloze_hi", pa.float64()), ("cloze_items", pa.int64()),
    ("choice_acc", pa.float64()), ("choice_lo", pa.float64()), ("choice_hi", pa.float64()),
    ("choice_items", pa.int64()),
    ("audit_params_dev", pa.float64()), ("audit_active_dev", pa.float64()), ("audit_tokens_dev", pa.float64()),
    ("audit_flops_dev", pa.float64()), ("audit_max_dev", pa.float64()), ("audit_ok", pa.bool_()),
    ("wall_seconds", pa.float64()), ("params_sha256", pa.string()), ("eval_sha256", pa.string()),
    ("train_flops_exact", pa.float64()),  # issue 14: every matmul x tokens read (any convention)
]
# the `steps` table: the trainer's steps.parquet columns (their schema lives with the writer) under the run
STEPS_TABLE_COLUMNS: list[tuple[str, pa.DataType]] = [("run_id", pa.string()), ("study", pa.string()), *STEP_COLUMNS]
LOAD_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("run_id", pa.string()), ("study", pa.string()), ("layer", pa.int64()), ("expert", pa.int64()),
    ("fraction", pa.float64()), ("over_uniform", pa.float64()),
]
DOC_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("run_id", pa.string()), ("split", pa.string()), ("doc", pa.int64()), ("nats", pa.float64()),
    ("tokens", pa.int64()), ("bytes", pa.int64()),
]
AUDIT_KEYS = {"audit_params_dev": "nonvocab_params", "audit_active_dev": "nonvocab_active",
              "audit_tokens_dev": "tokens", "audit_flops_dev": "flops_per_token"}
# What collect reads from each input (dotted: nested keys), all written by every plan, train and evaluate
# stage; `audit` (optional: null columns without it) and the eval intervals and tasks (present, null when
# turned off) are read apart.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "plan": ("arch.kind", "arch.ffn_hidden", "arch.experts", "arch.top_k", "arch.shared_experts", "arch.seq_len",
             "nonvocab_params", "nonvocab_active", "activation_rate", "target_params", "compute",
             "compute_convention", "flops_per_token", "tokens", "steps", "unique_tokens", "provenance.params_sha256",
             "vocab_size"),
    "train": ("nonvocab_params", "nonvocab_active", "tokens_seen", "steps", "seed", "lr", "final_train_loss",
              "wall_seconds", "expert_load", "provenance.params_sha256"),
    "eval": ("plan.nonvocab_params", "plan.nonvocab_active", "loss", "loss_ci", "perplexity", "bpb", "bpb_ci",
             "tokens", "bytes", "tasks", "provenance.params_sha256"),
}
STAGE_OF = {"plan": "plan", "train": "train", "eval": "evaluate"}


class CollectError(ValueError):
    """Run outputs that disagree or lack what the study database needs (names the file)."""


def schema(cols: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(cols)


def require_keys(name: str, d: dict[str, Any], path: Path) -> None:
    """Every REQUIRED_KEYS[name] key in `d`, else one error naming the file and the first missing key."""
    for key in REQUIRED_KEYS[name]:
        obj: Any = d
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                raise CollectError(f"{path}: missing key `{key}` (re-run the {STAGE_OF[name]} stage)")
            obj = obj[part]


def _ci(e: dict[str, Any], key: str) -> list[float]:
    return e[f"{key}_ci"] or [e[key], e[key]]  # null when eval.bootstrap = 0


def _task(e: dict[str, Any], name: str) -> tuple[Any, Any, Any, Any]:
    t = (e["tasks"] or {}).get(name)  # null when eval.task_items = 0
    if not t or not t.get("items"):
        return None, None, None, 0
    lo, hi = t["acc_ci"]
    return t["acc"], lo, hi, t["items"]


def audit_columns(train: dict[str, Any], path: Path) -> dict[str, Any]:
    """The audit deviations of train.json (contract: {key: {plan, actual, rel_dev}}, max_rel_dev, ok)."""
    audit = train.get("audit")
    out: dict[str, Any] = dict.fromkeys([*AUDIT_KEYS, "audit_max_dev", "audit_ok"])
    if audit is None:
        return out
    try:
        for col, key in AUDIT_KEYS.items():
            if key in audit:
                out[col] = float(audit[key]["rel_dev"])
        out["audit_max_dev"] = float(audit["max_rel_dev"])
        out["audit_ok"] = bool(audit["ok"])
    except (KeyError, TypeError, ValueError) as err:
        raise CollectError(f"{path}: `audit` does not follow the contract ({err!r})") from None
    return out


def run_row(p: Params, run: str, plan: dict[str, Any], train: dict[str, Any], e: dict[str, Any],
            paths: dict[str, Path]) -> dict[str, Any]:
    """The run's `runs` row; the three files must have passed `require_keys`."""
    arch = plan["arch"]
    for key in ("nonvocab_params", "nonvocab_active"):
        if train[key] != plan[key] or e["plan"][key] != plan[key]:
            raise CollectError(f"{paths['train']} / {paths['eval']}: {key} differs from {paths['plan']} "
                               "(stale outputs: re-run train and evaluate)")
    prov = [d["provenance"]["params_sha256"] for d in (plan, train, e)]
    tokens_seen = train["tokens_seen"]
    loss_ci, bpb_ci = _ci(e, "loss"), _ci(e, "bpb")
    cloze, choice = _task(e, "cloze"), _task(e, "choice")
    return {
        "run_id": run, "study": p.study, "grp": p.run(run).group or run, "kind": arch["kind"],
        "seed": train["seed"], "lr": train["lr"], "size": float(plan["target_params"]),
        "total_params": train["nonvocab_params"], "active_params": train["nonvocab_active"],
        "activation_rate": plan["activation_rate"], "experts": arch["experts"], "top_k": arch["top_k"],
        "shared_experts": arch["shared_experts"], "ffn_hidden": arch["ffn_hidden"],
        "compute_budget": float(plan["compute"]), "compute_convention": plan["compute_convention"],
        "train_flops": float(plan["flops_per_token"]) * tokens_seen,
        "train_flops_exact": exact_train_flops(plan, tokens_seen),
        "tokens_seen": tokens_seen, "unique_tokens": plan["unique_tokens"],
        "epochs": unique_passes(tokens_seen, plan["unique_tokens"], arch["seq_len"]),
        "steps": train["steps"], "final_train_loss": train["final_train_loss"],
        "val_loss": e["loss"], "val_loss_lo": loss_ci[0], "val_loss_hi": loss_ci[1],
        "val_ppl": e["perplexity"],
        "val_bpb": e["bpb"], "val_bpb_lo": bpb_ci[0], "val_bpb_hi": bpb_ci[1],
        "eval_tokens": e["tokens"], "eval_bytes": e["bytes"], "eval_docs": e.get("docs"),
        "validation_loss": (e.get("validation") or {}).get("loss"),
        "validation_bpb": (e.get("validation") or {}).get("bpb"),
        "cloze_acc": cloze[0], "cloze_lo": cloze[1], "cloze_hi": cloze[2], "cloze_items": cloze[3],
        "choice_acc": choice[0], "choice_lo": choice[1], "choice_hi": choice[2], "choice_items": choice[3],
        **audit_columns(train, paths["train"]),
        "wall_seconds": train["wall_seconds"], "params_sha256": sha256_json(prov),
        "eval_sha256": sha256_file(paths["eval"]),
    }


def step_rows(run: str, study: str, rdir: Path) -> pa.Table:
    """The training curve from the trainer's steps.parquet (its MoE-only columns already null for dense runs).

    A column the file lacks is null, so a trainer that logs fewer columns still collects.
    """
    path = rdir / "steps.parquet"
    if not path.exists():
        raise CollectError(f"{path}: missing (run the train stage)")
    t = pq.read_table(path)
    n = t.num_rows
    data = {c: t.column(c).to_pylist() if c in t.column_names else [None] * n for c, _ in STEP_COLUMNS}
    return pa.table({"run_id": [run] * n, "study": [study] * n, **data}, schema=schema(STEPS_TABLE_COLUMNS))


def load_rows(run: str, study: str, train: dict[str, Any]) -> pa.Table:
    rows: list[dict[str, Any]] = []
    load = train["expert_load"] or {}  # null for dense runs
    for layer, fractions in enumerate(load.get("fraction_per_expert") or []):
        for expert, f in enumerate(fractions):
            rows.append({"run_id": run, "study": study, "layer": layer, "expert": expert, "fraction": float(f),
                         "over_uniform": float(f) * len(fractions)})
    return pa.Table.from_pylist(rows, schema=schema(LOAD_COLUMNS))


def doc_rows(run: str, path: Path) -> pa.Table:
    """The run's per-document scores (evaluate's <run>.docs.parquet) with its run id; empty without the file."""
    if not path.exists():
        log.warning("%s: missing (an evaluation before per-document scores): no paired intervals for %s", path, run)
        return pa.Table.from_pylist([], schema=schema(DOC_COLUMNS))
    try:
        t = pq.read_table(path, columns=[c for c, _ in DOC_COLUMNS[1:]])
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise CollectError(f"{path}: unreadable or lacks columns split/doc/nats/tokens/bytes ({err})") from None
    t = t.add_column(0, "run_id", pa.array([run] * t.num_rows, pa.string()))
    return t.cast(schema(DOC_COLUMNS))


def run_collect(p: Params, run: str, work: Path = WORK) -> dict[str, Any]:
    p.run(run)
    rdir = work / "runs" / run
    paths = {"plan": rdir / "plan.json", "train": rdir / "train.json", "eval": work / "eval" / f"{run}.json"}
    plan, train, e = (read_json(paths[k]) for k in ("plan", "train", "eval"))
    for name, d in (("plan", plan), ("train", train), ("eval", e)):
        require_keys(name, d, paths[name])
    row = run_row(p, run, plan, train, e, paths)
    out = work / "collect" / run
    with atomic_path(out) as tmp:
        tmp.mkdir()
        pq.write_table(pa.Table.from_pylist([row], schema=schema(RUN_COLUMNS)), tmp / "run.parquet",
                       compression="zstd")
        pq.write_table(step_rows(run, p.study, rdir), tmp / "steps.parquet", compression="zstd")
        pq.write_table(load_rows(run, p.study, train), tmp / "expert_load.parquet", compression="zstd")
        pq.write_table(doc_rows(run, work / "eval" / f"{run}.docs.parquet"), tmp / "docs.parquet",
                       compression="zstd")
    if row["audit_ok"] is False:
        log.warning("%s: the audit deviates from the plan by %.2f%% (train.json audit)", run,
                    100 * row["audit_max_dev"])
    log.info("%s: collected (val bpb %.4f)", run, row["val_bpb"])
    return row
