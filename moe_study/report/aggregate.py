"""The study database (DuckDB) from the per-run collect outputs, and the study report.

Incremental by construction: each run's rows are made once by collect@run (work/collect/<run>/);
this stage only unions them with DuckDB `read_parquet` (the runs of params.yaml, nothing stale), adds
the views and writes the exports, so adding a run re-collects that run alone.

`results/<study>/metrics.duckdb` (and a copy of the current study at `results/metrics.duckdb`):
- table `runs`: one row per run (columns: moe_study/report/collect.py RUN_COLUMNS: run_id, study, kind,
  total_params, active_params, activation_rate, experts, top_k, shared_experts, train_flops (F x T in
  the budget's compute convention), train_flops_exact (every matmul x T, any convention), tokens_seen,
  unique_tokens, epochs, val_loss, val_bpb, cloze/choice accuracies with Wilson
  intervals, audit deviations, params_sha256, ...);
- table `steps`: every run's training curve; table `expert_load`: routed fraction per layer/expert;
- table `study`: one row, `status` 'failed' when a run's audit is not ok (`audit_ok`, decided by
  moe_study/train/audit.py against accounting.AUDIT_TOLERANCE; not re-judged here);
- view `dense_baseline`: THE dense baseline of every "vs dense" figure (see DENSE_BASELINE);
- view `moe_vs_dense`: each MoE run beside its dense baseline: Δloss, Δbpb, Δaccuracy;
- view `by_activation_rate`: runs grouped by study, size, kind and activation rate.
Exports (moe_study/report/summary.py): summary.md, results.csv, metrics.json (`dvc exp show`) and the plots.

The unit of comparison in the summary is a *group* (a run name, or `runs.<name>.group` for seeds of
one point): its mean with a 95% interval, the run's own interval (bootstrap for losses, Wilson for
accuracies) for a single seed, a Student-t interval over seeds when a group has several (for an
accuracy, the wider of that and the Wilson interval of all the seeds' items pooled, clipped to [0, 1]).
A group's "Δ bpb vs dense" is its mean minus the `dense_baseline` view's value, read from the database,
so the summary and the views cannot disagree about what "dense" means.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_study.accounting import AUDIT_TOLERANCE
from moe_study.config.schema import Params
from moe_study.evaluation.stats import t95, wilson
from moe_study.io import WORK, atomic_path, write_bytes, write_json
from moe_study.report.summary import (
    csv_text,
    plot_expert_load,
    plot_loss_vs_activation,
    plot_training_curves,
    summary_markdown,
)

COLLECT_DIR = WORK / "collect"
METRIC_KEYS = ("val_loss", "val_bpb", "val_bpb_lo", "val_bpb_hi", "cloze_acc", "choice_acc", "final_train_loss",
               "activation_rate", "tokens_seen", "epochs", "audit_max_dev")  # per run, for `dvc exp show`
TABLES = ("runs", "steps", "expert_load")
ACCURACIES = {"cloze_acc": "cloze_items", "choice_acc": "choice_items"}
INTERVALS = (("val_loss", "val_loss_lo", "val_loss_hi"), ("val_bpb", "val_bpb_lo", "val_bpb_hi"),
             ("cloze_acc", "cloze_lo", "cloze_hi"), ("choice_acc", "choice_lo", "choice_hi"))

log = logging.getLogger("stages.aggregate")

# The dense baseline, defined once (here) for the views and the summary. The study compares runs at
# equal N (budget `size`), C (`compute_budget`) and U (`unique_tokens`), and the seeds of a point are
# replicates, so the baseline of a run is the mean over the dense *runs* (every seed counts once) that
# share its study, N, C and U. Several dense groups at one (N, C, U), e.g. a learning-rate sweep, are
# pooled run by run, not group by group (`dense_groups` and `dense_run_ids` name what was pooled).
BASELINE_KEY = ("study", "size", "compute_budget", "unique_tokens")
DENSE_BASELINE = f"""
        SELECT {", ".join(BASELINE_KEY)}, count(*) AS dense_runs,
               string_agg(run_id, ',' ORDER BY run_id) AS dense_run_ids,
               string_agg(DISTINCT grp, ',' ORDER BY grp) AS dense_groups,
               avg(total_params) AS dense_total_params, avg(tokens_seen) AS dense_tokens_seen,
               avg(val_loss) AS dense_val_loss, avg(val_bpb) AS dense_val_bpb,
               avg(cloze_acc) AS dense_cloze_acc, avg(choice_acc) AS dense_choice_acc,
               avg(train_flops_exact) AS dense_train_flops_exact
        FROM runs WHERE kind = 'dense' GROUP BY {", ".join(BASELINE_KEY)}
        ORDER BY {", ".join(BASELINE_KEY)}"""

VIEWS = {  # created in this order: moe_vs_dense reads dense_baseline
    "dense_baseline": DENSE_BASELINE,
    "moe_vs_dense": f"""
        SELECT m.run_id, m.study, m.grp, m.size, m.activation_rate, m.experts, m.top_k, m.shared_experts,
               m.total_params, d.dense_total_params, m.active_params, m.compute_budget, m.unique_tokens,
               m.tokens_seen, d.dense_tokens_seen, m.epochs, d.dense_runs, d.dense_run_ids, d.dense_groups,
               m.val_loss, d.dense_val_loss, m.val_loss - d.dense_val_loss AS d_val_loss,
               m.val_bpb, d.dense_val_bpb, m.val_bpb - d.dense_val_bpb AS d_val_bpb,
               m.cloze_acc, d.dense_cloze_acc, m.cloze_acc - d.dense_cloze_acc AS d_cloze_acc,
               m.choice_acc, d.dense_choice_acc, m.choice_acc - d.dense_choice_acc AS d_choice_acc,
               m.train_flops_exact, d.dense_train_flops_exact,
               m.train_flops_exact / d.dense_train_flops_exact AS flops_exact_vs_dense
        FROM runs m JOIN dense_baseline d USING ({", ".join(BASELINE_KEY)})
        WHERE m.kind = 'moe' ORDER BY m.study, m.size, m.activation_rate DESC, m.run_id""",
    "by_activation_rate": """
        SELECT study, size, kind, round(activation_rate, 4) AS activation_rate, count(*) AS runs,
               string_agg(DISTINCT grp, ',' ORDER BY grp) AS groups,
               avg(val_loss) AS val_loss, stddev_samp(val_loss) AS val_loss_sd,
               avg(val_bpb) AS val_bpb, stddev_samp(val_bpb) AS val_bpb_sd,
               avg(cloze_acc) AS cloze_acc, avg(choice_acc) AS choice_acc,
               avg(tokens_seen) AS tokens_seen, avg(epochs) AS epochs, avg(total_params) AS total_params,
               avg(active_params) AS active_params
        FROM runs GROUP BY study, size, kind, round(activation_rate, 4)
        ORDER BY study, size, activation_rate DESC""",
}


class AggregateError(ValueError):
    """Missing or inconsistent per-run outputs (names the run and the file)."""


# ----------------------------------------------------------------------------------------- groups
def group_rows(rows: list[dict[str, Any]], baselines: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per group: mean of its seeds, interval over seeds (or the run's own interval if alone).

    `baselines` are the rows of the `dense_baseline` view; a group's `bpb_vs_dense` is its mean bpb
    minus the baseline of its (study, N, C, U), null without one. The baseline is read, not recomputed
    here, so that it has one definition (DENSE_BASELINE).
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["grp"], []).append(r)
    out = []
    for name, rs in groups.items():
        g = dict(rs[0], grp=name, seeds=len(rs))
        for m, lo, hi in INTERVALS:
            vals = [r[m] for r in rs]
            if any(v is None for v in vals):
                g[m] = g[lo] = g[hi] = None
                continue
            g[m] = statistics.fmean(vals)
            if len(rs) > 1:
                half = t95(len(rs)) * statistics.stdev(vals) / math.sqrt(len(rs))
                g[lo], g[hi] = g[m] - half, g[m] + half
                if m in ACCURACIES:  # seeds that agree must not hide the item sampling: the wider interval
                    items = sum(r[ACCURACIES[m]] for r in rs)
                    w = wilson(round(sum(r[m] * r[ACCURACIES[m]] for r in rs)), items) or [g[lo], g[hi]]
                    g[lo], g[hi] = max(0.0, min(g[lo], w[0])), min(1.0, max(g[hi], w[1]))
        g["tokens_seen"] = statistics.fmean(r["tokens_seen"] for r in rs)
        g["epochs"] = statistics.fmean(r["epochs"] for r in rs)
        out.append(g)
    base = {tuple(b[k] for k in BASELINE_KEY): b["dense_val_bpb"] for b in baselines}
    for g in out:
        b = base.get(tuple(g[k] for k in BASELINE_KEY)) if base else None
        g["bpb_vs_dense"] = g["val_bpb"] - b if b is not None and g["val_bpb"] is not None else None
    return sorted(out, key=lambda g: (g["size"], -g["activation_rate"], g["grp"]))


# --------------------------------------------------------------------------------------- database
def _files(collect_dir: Path, runs: list[str], name: str) -> list[str]:
    missing = [r for r in runs if not (collect_dir / r / name).exists()]
    if missing:
        raise AggregateError(f"no {name} for runs {missing} in {collect_dir} (run the collect stage)")
    return [str(collect_dir / r / name) for r in runs]


def build_database(dest: Path, collect_dir: Path, runs: list[str]) -> None:
    """runs/steps/expert_load unioned from the per-run Parquet files, the views, the study status."""
    import duckdb

    with atomic_path(dest) as tmp:
        con = duckdb.connect(str(tmp))
        for table in TABLES:
            files = ", ".join(f"'{f}'" for f in _files(collect_dir, runs, f"{'run' if table == 'runs' else table}"
                                                                          ".parquet"))
            order = "run_id" + (", step" if table == "steps" else ", layer, expert" if table == "expert_load" else "")
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet([{files}]) ORDER BY {order}")
        for name, sql in VIEWS.items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        con.execute("""
            CREATE TABLE study AS
            SELECT any_value(study) AS study, count(*) AS runs,
                   count(*) FILTER (WHERE audit_ok IS NOT NULL) AS audited_runs,
                   max(audit_max_dev) AS audit_max_dev,
                   string_agg(run_id, ',' ORDER BY run_id) FILTER (WHERE NOT audit_ok) AS audit_failed_runs,
                   CASE WHEN bool_or(NOT audit_ok) THEN 'failed' ELSE 'ok' END AS status
            FROM runs""")
        con.close()


def query(db: Path, sql: str) -> list[dict[str, Any]]:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def aggregate(p: Params, collect_dir: Path = COLLECT_DIR, results: Path | None = None,
              current_copy: Path | None = Path("results") / "metrics.duckdb") -> str:
    """Build the database and every export; returns the summary (what `make study` prints)."""
    results = results or Path("results") / p.study
    runs = sorted(p.runs)
    db = results / "metrics.duckdb"
    build_database(db, collect_dir, runs)
    rows = query(db, "SELECT * FROM runs ORDER BY run_id")
    study = query(db, "SELECT * FROM study")[0]
    moe_vs_dense = query(db, "SELECT * FROM moe_vs_dense")
    baselines = query(db, "SELECT * FROM dense_baseline")
    steps = query(db, "SELECT run_id, step, tokens, loss FROM steps ORDER BY run_id, step")
    load = query(db, "SELECT * FROM expert_load ORDER BY run_id, layer, expert")
    groups = group_rows(rows, baselines)
    summary = summary_markdown(p.study, groups, moe_vs_dense, study, rows)
    write_bytes(results / "summary.md", summary.encode())
    write_bytes(results / "results.csv", csv_text(rows).encode())
    metrics: dict[str, Any] = {r["run_id"]: {k: r[k] for k in METRIC_KEYS} for r in rows}
    metrics["_study"] = {"status": study["status"], "audit_max_dev": study["audit_max_dev"], "runs": study["runs"]}
    write_json(results / "metrics.json", metrics)
    plot_loss_vs_activation(results / "loss_vs_activation.png", groups, p.study)
    plot_training_curves(results / "training_curves.png", rows, steps, p.study)
    plot_expert_load(results / "expert_load.png", rows, load, p.study)
    if current_copy is not None:
        write_bytes(current_copy, db.read_bytes())
    if study["status"] != "ok":
        log.error("study %s FAILED the resource audit: runs %s deviate from their plan by more than %.0f%%",
                  p.study, study["audit_failed_runs"], 100 * AUDIT_TOLERANCE)
    return summary
