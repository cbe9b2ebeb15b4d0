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
- table `doc_scores`: every run's per-document held-out and validation scores (split, doc, nats, tokens,
  bytes; collect's docs.parquet), the input of the paired intervals;
- table `lr_choice`: per group and learning rate, the mean validation loss / bpb over its seeds (and
  the held-out test figures, to show the whole grid); `best` marks the group's lr of lowest validation
  loss (a group of one lr: that lr). Every comparison below uses each group at its own best lr. A group
  with several lrs needs validation scores (split.validation_fraction > 0), else the stage fails;
- view `dense_baseline`: THE dense baseline of every "vs dense" figure (see DENSE_BASELINE);
- view `moe_vs_dense`: each MoE run beside its dense baseline: Δloss, Δbpb, Δaccuracy, with 95%
  intervals `d_val_loss_lo/hi`, `d_val_bpb_lo/hi` (paired bootstrap over the held-out documents: one
  run is one seed), `ci_method`, `d_val_loss_excludes_zero` / `d_val_bpb_excludes_zero`, `at_best_lr`;
- table `group_vs_dense`: each MoE group at its best lr vs the dense baseline: Δ and its 95% interval,
  Welch over seeds when both arms have >= 2 seeds, else the paired document bootstrap of the arms'
  per-document means (`ci_method`), and whether it excludes zero (moe_study/report/intervals.py);
- table `group_vs_dense_other_compute`: the same, each MoE group vs the dense runs of its study, N and U
  at every other compute budget (`compute_ratio` = their budget / the group's: 2.0 for dense at 2C, the
  paper's data-reuse reference); these are never pooled into the equal-compute baseline;
- view `by_activation_rate`: runs grouped by study, size, kind and activation rate.
Exports (moe_study/report/summary.py): summary.md, results.csv, metrics.json (`dvc exp show`) and the plots.

The unit of comparison in the summary is a *group* (a run name, or `runs.<name>.group` for seeds of
one point): its mean with a 95% interval, the run's own interval (bootstrap for losses, Wilson for
accuracies) for a single seed, a Student-t interval over seeds when a group has several (for an
accuracy, the wider of that and the Wilson interval of all the seeds' items pooled, clipped to [0, 1]).
A group's "Δ bpb vs dense" is its mean minus the `dense_baseline` view's value, read from the database,
so the summary and the views cannot disagree about what "dense" means. The runs of a group must agree
on its configuration (GROUP_FIELDS: N, N_active, r_a, experts, tokens, ...): a mismatch is an error
naming the group and the field, never a silent first-seed value.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_study.accounting import AUDIT_TOLERANCE
from moe_study.config.schema import Params
from moe_study.evaluation.stats import t95, wilson
from moe_study.io import WORK, atomic_path, write_bytes, write_json
from moe_study.report.intervals import excludes_zero, paired_bootstrap, welch
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
TABLES = ("runs", "steps", "expert_load", "doc_scores")
TABLE_FILE = {"runs": "run.parquet", "doc_scores": "docs.parquet"}  # others: <table>.parquet
# what the runs of one group (its seeds, and the lrs of its grid) must share
GROUP_FIELDS = ("study", "kind", "size", "total_params", "active_params", "activation_rate", "experts", "top_k",
                "shared_experts", "ffn_hidden", "compute_budget", "compute_convention", "unique_tokens",
                "tokens_seen", "steps")
CI_COLUMNS = ("d_val_loss_lo", "d_val_loss_hi", "d_val_bpb_lo", "d_val_bpb_hi")
ACCURACIES = {"cloze_acc": "cloze_items", "choice_acc": "choice_items"}
INTERVALS = (("val_loss", "val_loss_lo", "val_loss_hi"), ("val_bpb", "val_bpb_lo", "val_bpb_hi"),
             ("cloze_acc", "cloze_lo", "cloze_hi"), ("choice_acc", "choice_lo", "choice_hi"))

log = logging.getLogger("stages.aggregate")

# The dense baseline, defined once (here) for the views and the summary. The study compares runs at
# equal N (budget `size`), C (`compute_budget`) and U (`unique_tokens`), and the seeds of a point are
# replicates, so the baseline of a run is the mean over the dense *runs* (every seed counts once) that
# share its study, N, C and U. Several dense groups at one (N, C, U), e.g. a learning-rate sweep, are
# pooled run by run, not group by group (`dense_groups` and `dense_run_ids` name what was pooled). A dense
# group enters at its best learning rate only (table `lr_choice`).
BASELINE_KEY = ("study", "size", "compute_budget", "unique_tokens")
DENSE_BASELINE = f"""
        SELECT {", ".join(BASELINE_KEY)}, count(*) AS dense_runs,
               string_agg(run_id, ',' ORDER BY run_id) AS dense_run_ids,
               string_agg(DISTINCT grp, ',' ORDER BY grp) AS dense_groups,
               avg(total_params) AS dense_total_params, avg(tokens_seen) AS dense_tokens_seen,
               avg(val_loss) AS dense_val_loss, avg(val_bpb) AS dense_val_bpb,
               avg(cloze_acc) AS dense_cloze_acc, avg(choice_acc) AS dense_choice_acc,
               avg(train_flops_exact) AS dense_train_flops_exact
        FROM runs WHERE kind = 'dense' AND (study, grp, lr) IN (SELECT (study, grp, lr) FROM lr_choice WHERE best)
        GROUP BY {", ".join(BASELINE_KEY)}
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
               m.train_flops_exact / d.dense_train_flops_exact AS flops_exact_vs_dense,
               c.d_val_loss_lo, c.d_val_loss_hi, c.d_val_bpb_lo, c.d_val_bpb_hi, c.ci_method,
               c.d_val_loss_excludes_zero, c.d_val_bpb_excludes_zero, m.lr, l.best AS at_best_lr
        FROM runs m JOIN dense_baseline d USING ({", ".join(BASELINE_KEY)})
        LEFT JOIN run_delta_ci c USING (run_id) JOIN lr_choice l ON l.study = m.study AND l.grp = m.grp AND l.lr = m.lr
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
    check_group_metadata(rows)
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


def check_group_metadata(rows: Sequence[dict[str, Any]]) -> None:
    """Raise AggregateError naming the group and field when the runs of a group disagree on GROUP_FIELDS."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["grp"], []).append(r)
    for name, rs in groups.items():
        for f in GROUP_FIELDS:
            vals = {str(r.get("run_id", i)): r.get(f) for i, r in enumerate(rs)}
            if len({repr(v) for v in vals.values()}) > 1:
                detail = ", ".join(f"{k}: {v!r}" for k, v in vals.items())
                raise AggregateError(f"group {name!r}: {f} differs across its runs ({detail}); the seeds (and "
                                     "learning rates) of a group must share its configuration")


def choose_lr(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (study, group, lr): seeds, mean validation and test figures; `best` = lowest validation loss.

    A group of one learning rate keeps it (no validation needed); a group of several needs the
    validation scores of every run, else AggregateError naming the group.
    """
    by: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for r in rows:
        by.setdefault((r["study"], r["grp"]), {}).setdefault(r["lr"], []).append(r)
    out = []

    def mean(rs: list[dict], k: str) -> float | None:
        vals = [r[k] for r in rs]
        return None if any(v is None for v in vals) else statistics.fmean(vals)

    for (study, grp), lrs in sorted(by.items()):
        if len(lrs) > 1:
            missing = sorted(r["run_id"] for rs in lrs.values() for r in rs if r.get("validation_loss") is None)
            if missing:
                raise AggregateError(f"group {grp!r}: {len(lrs)} learning rates but no validation scores for runs "
                                     f"{missing} (set split.validation_fraction > 0, re-run split and evaluate)")
        best = min(lrs, key=lambda lr: (mean(lrs[lr], "validation_loss") or 0.0, lr)) if len(lrs) > 1 else \
            next(iter(lrs))
        for lr, rs in sorted(lrs.items()):
            out.append({"study": study, "grp": grp, "lr": lr, "runs": len(rs),
                        "run_ids": ",".join(sorted(r["run_id"] for r in rs)),
                        "validation_loss": mean(rs, "validation_loss"), "validation_bpb": mean(rs, "validation_bpb"),
                        "val_loss": mean(rs, "val_loss"), "val_bpb": mean(rs, "val_bpb"), "best": lr == best,
                        "grid": len(lrs)})
    return out


def _doc_arrays(con: Any) -> dict[str, dict[str, np.ndarray]]:
    """Per run: the held-out per-document arrays (doc, nats, tokens, bytes), doc order."""
    t = con.execute("SELECT run_id, doc, nats, tokens, bytes FROM doc_scores WHERE split = 'heldout' "
                    "ORDER BY run_id, doc").fetchnumpy()
    out: dict[str, dict[str, np.ndarray]] = {}
    run_ids = np.asarray(t["run_id"], dtype=object)
    for run in dict.fromkeys(run_ids.tolist()):
        m = run_ids == run
        out[run] = {k: np.asarray(t[k])[m] for k in ("doc", "nats", "tokens", "bytes")}
    return out


def _paired(docs: dict[str, dict[str, np.ndarray]], a: list[str], b: list[str], resamples: int,
            seed: int) -> dict[str, Any] | None:
    """The paired bootstrap of arm a minus arm b; None when a run has no per-document scores."""
    if any(r not in docs for r in a + b):
        return None
    ref = docs[b[0]]
    for r in a + b:
        d = docs[r]
        if not (np.array_equal(d["doc"], ref["doc"]) and np.array_equal(d["tokens"], ref["tokens"])
                and np.array_equal(d["bytes"], ref["bytes"])):
            raise AggregateError(f"runs {r} and {b[0]} scored different held-out documents (re-run evaluate)")
    return paired_bootstrap([docs[r]["nats"] for r in a], [docs[r]["nats"] for r in b], ref["tokens"],
                            ref["bytes"], resamples, seed) | {"ci_method": "paired_bootstrap"}


def _flags(row: dict[str, Any]) -> dict[str, Any]:
    return {"d_val_loss_excludes_zero": excludes_zero(row.get("d_val_loss_lo"), row.get("d_val_loss_hi")),
            "d_val_bpb_excludes_zero": excludes_zero(row.get("d_val_bpb_lo"), row.get("d_val_bpb_hi"))}


def _group_delta(rs: list[dict[str, Any]], b: dict[str, Any], by_id: dict[str, dict[str, Any]],
                 docs: dict[str, dict[str, np.ndarray]], resamples: int, seed: int) -> dict[str, Any]:
    """One MoE group's seeds `rs` (at its best lr) minus the dense baseline row `b`: Δ and its 95% interval,
    Welch over seeds when both arms have >= 2 runs, else the paired document bootstrap."""
    dense = b["dense_run_ids"].split(",")
    g: dict[str, Any] = {"study": rs[0]["study"], "grp": rs[0]["grp"], "size": rs[0]["size"],
                         "activation_rate": rs[0]["activation_rate"], "lr": rs[0]["lr"], "seeds": len(rs),
                         "run_ids": ",".join(r["run_id"] for r in rs), "dense_runs": len(dense),
                         "dense_run_ids": b["dense_run_ids"],
                         "val_loss": statistics.fmean(r["val_loss"] for r in rs), "dense_val_loss": b["dense_val_loss"],
                         "val_bpb": statistics.fmean(r["val_bpb"] for r in rs), "dense_val_bpb": b["dense_val_bpb"],
                         "dense_compute_budget": b["compute_budget"],
                         "compute_ratio": b["compute_budget"] / rs[0]["compute_budget"]}
    g["d_val_loss"], g["d_val_bpb"] = g["val_loss"] - g["dense_val_loss"], g["val_bpb"] - g["dense_val_bpb"]
    if len(rs) >= 2 and len(dense) >= 2:
        for m in ("val_loss", "val_bpb"):
            _, g[f"d_{m}_lo"], g[f"d_{m}_hi"] = welch([r[m] for r in rs], [by_id[d][m] for d in dense])
        g["ci_method"] = "welch"
    else:
        ci = _paired(docs, [r["run_id"] for r in rs], dense, resamples, seed) or {"ci_method": None}
        g.update({k: ci.get(k) for k in CI_COLUMNS}, ci_method=ci["ci_method"])
    return g | _flags(g)


def delta_intervals(con: Any, resamples: int, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(per MoE run, per MoE group at its best lr, per MoE group vs the dense runs of the same study, N and
    U at every *other* compute budget, e.g. the 2C data-reuse reference): Δ vs dense with 95% intervals."""
    cur = con.execute("SELECT * FROM dense_baseline")
    cols = [c[0] for c in cur.description]
    base = {tuple(r[:len(BASELINE_KEY)]): dict(zip(cols, r, strict=True)) for r in cur.fetchall()}
    cur = con.execute("SELECT r.*, l.best FROM runs r JOIN lr_choice l USING (study, grp, lr) ORDER BY run_id")
    cols = [c[0] for c in cur.description]
    rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    docs = _doc_arrays(con)
    per_run, groups = [], {}
    for r in rows:
        b = base.get(tuple(r[k] for k in BASELINE_KEY))
        if r["kind"] != "moe" or b is None:
            continue
        dense = b["dense_run_ids"].split(",")
        ci = _paired(docs, [r["run_id"]], dense, resamples, seed) or {"ci_method": None}
        row = {"run_id": r["run_id"], **{k: ci.get(k) for k in CI_COLUMNS}, "ci_method": ci["ci_method"]}
        per_run.append(row | _flags(row))
        if r["best"]:
            groups.setdefault((r["study"], r["grp"]), []).append(r)
    by_id = {r["run_id"]: r for r in rows}
    same_n_u = [k for k in BASELINE_KEY if k != "compute_budget"]  # the other-compute references share these
    same, other = [], []
    for _, rs in sorted(groups.items()):
        key = tuple(rs[0][k] for k in BASELINE_KEY)
        same.append(_group_delta(rs, base[key], by_id, docs, resamples, seed))
        for bkey, b in sorted(base.items()):
            if bkey != key and all(b[k] == rs[0][k] for k in same_n_u):
                other.append(_group_delta(rs, b, by_id, docs, resamples, seed))
    return per_run, same, other


def _create_table(con: Any, name: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    con.execute(f"CREATE TABLE {name} ({', '.join(f'{c} {t}' for c, t in columns)})")
    if rows:
        con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(columns))})",
                        [[r.get(c) for c, _ in columns] for r in rows])


LR_CHOICE_COLUMNS = [("study", "VARCHAR"), ("grp", "VARCHAR"), ("lr", "DOUBLE"), ("runs", "BIGINT"),
                     ("run_ids", "VARCHAR"), ("validation_loss", "DOUBLE"), ("validation_bpb", "DOUBLE"),
                     ("val_loss", "DOUBLE"), ("val_bpb", "DOUBLE"), ("best", "BOOLEAN"), ("grid", "BIGINT")]
FLAG_COLUMNS = [("ci_method", "VARCHAR"), ("d_val_loss_excludes_zero", "BOOLEAN"),
                ("d_val_bpb_excludes_zero", "BOOLEAN")]
RUN_CI_COLUMNS = [("run_id", "VARCHAR"), *[(c, "DOUBLE") for c in CI_COLUMNS], *FLAG_COLUMNS]
GROUP_CI_COLUMNS = [("study", "VARCHAR"), ("grp", "VARCHAR"), ("size", "DOUBLE"), ("activation_rate", "DOUBLE"),
                    ("lr", "DOUBLE"), ("seeds", "BIGINT"), ("run_ids", "VARCHAR"), ("dense_runs", "BIGINT"),
                    ("dense_run_ids", "VARCHAR"), ("val_loss", "DOUBLE"), ("dense_val_loss", "DOUBLE"),
                    ("d_val_loss", "DOUBLE"), ("d_val_loss_lo", "DOUBLE"), ("d_val_loss_hi", "DOUBLE"),
                    ("val_bpb", "DOUBLE"), ("dense_val_bpb", "DOUBLE"), ("d_val_bpb", "DOUBLE"),
                    ("d_val_bpb_lo", "DOUBLE"), ("d_val_bpb_hi", "DOUBLE"), *FLAG_COLUMNS]
# the same columns vs a dense baseline at another compute budget of the same N and U (compute_ratio:
# the dense runs' budget over the group's, e.g. 2.0 for the data-reuse reference at 2C)
GROUP_OTHER_COMPUTE_COLUMNS = [*GROUP_CI_COLUMNS, ("dense_compute_budget", "DOUBLE"), ("compute_ratio", "DOUBLE")]


# --------------------------------------------------------------------------------------- database
def _files(collect_dir: Path, runs: list[str], name: str) -> list[str]:
    missing = [r for r in runs if not (collect_dir / r / name).exists()]
    if missing:
        raise AggregateError(f"no {name} for runs {missing} in {collect_dir} (run the collect stage)")
    return [str(collect_dir / r / name) for r in runs]


def build_database(dest: Path, collect_dir: Path, runs: list[str], resamples: int = 1000, seed: int = 0) -> None:
    """runs/steps/expert_load/doc_scores unioned from the per-run Parquet files, the lr choice, the views
    and the Δ intervals (`resamples` paired-bootstrap draws seeded by `seed`), the study status."""
    import duckdb

    orders = {"steps": ", step", "expert_load": ", layer, expert", "doc_scores": ", split, doc"}
    with atomic_path(dest) as tmp:
        con = duckdb.connect(str(tmp))
        for table in TABLES:
            files = ", ".join(f"'{f}'" for f in _files(collect_dir, runs, TABLE_FILE.get(table, f"{table}.parquet")))
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet([{files}]) "
                        f"ORDER BY run_id{orders.get(table, '')}")
        cur = con.execute("SELECT * FROM runs ORDER BY run_id")
        cols = [c[0] for c in cur.description]
        run_rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        check_group_metadata(run_rows)
        _create_table(con, "lr_choice", choose_lr(run_rows), LR_CHOICE_COLUMNS)
        con.execute(f"CREATE VIEW dense_baseline AS {VIEWS['dense_baseline']}")
        per_run, per_group, other_compute = delta_intervals(con, resamples, seed)
        _create_table(con, "run_delta_ci", per_run, RUN_CI_COLUMNS)
        _create_table(con, "group_vs_dense", per_group, GROUP_CI_COLUMNS)
        _create_table(con, "group_vs_dense_other_compute", other_compute, GROUP_OTHER_COMPUTE_COLUMNS)
        for name, sql in VIEWS.items():
            if name != "dense_baseline":
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


def exact_vs_dense(rows: Sequence[dict[str, Any]], baselines: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Each run's train_flops_exact over the `dense_baseline` view's dense_train_flops_exact at its study,
    N, C and U: the one dense baseline the views use (its best-lr dense runs), for every run, dense too."""
    dense = {tuple(b[k] for k in BASELINE_KEY): b["dense_train_flops_exact"] for b in baselines}
    out: dict[str, float | None] = {}
    for r in rows:
        d = dense.get(tuple(r[k] for k in BASELINE_KEY))
        out[r["run_id"]] = r["train_flops_exact"] / d if d and r.get("train_flops_exact") else None
    return out


def aggregate(p: Params, collect_dir: Path = COLLECT_DIR, results: Path | None = None,
              current_copy: Path | None = Path("results") / "metrics.duckdb", runs: Sequence[str] | None = None,
              note: str = "") -> str:
    """Build the database and every export; returns the summary (what `make study` prints).

    `runs`: a subset of the study's runs (default all; a partial report of a study still running),
    `note`: a paragraph put first in summary.md (what the partial report lacks)."""
    results = results or Path("results") / p.study
    runs = sorted(runs if runs is not None else p.runs)
    db = results / "metrics.duckdb"
    build_database(db, collect_dir, runs, p.eval.bootstrap, p.eval.seed)
    rows = query(db, "SELECT * FROM runs ORDER BY run_id")
    lr_choice = query(db, "SELECT * FROM lr_choice ORDER BY study, grp, lr")
    best = {(c["grp"], c["lr"]) for c in lr_choice if c["best"]}
    group_deltas = query(db, "SELECT * FROM group_vs_dense ORDER BY size, activation_rate DESC, grp")
    other_compute = query(db, "SELECT * FROM group_vs_dense_other_compute "
                              "ORDER BY size, compute_ratio, activation_rate DESC, grp")
    study = query(db, "SELECT * FROM study")[0]
    moe_vs_dense = query(db, "SELECT * FROM moe_vs_dense")
    baselines = query(db, "SELECT * FROM dense_baseline")
    steps = query(db, "SELECT run_id, step, tokens, loss FROM steps ORDER BY run_id, step")
    load = query(db, "SELECT * FROM expert_load ORDER BY run_id, layer, expert")
    groups = group_rows([r for r in rows if (r["grp"], r["lr"]) in best], baselines)
    summary = summary_markdown(p.study, groups, moe_vs_dense, study, rows, group_deltas, lr_choice,
                               exact_vs_dense(rows, baselines), other_compute)
    if note:
        summary = f"{note}\n\n{summary}"
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
