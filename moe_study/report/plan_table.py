"""The study's plan as one table (results/<study>/plan.parquet and plan.md).

Its key figures per run also go to results/<study>/plan_metrics.json, a DVC metric, so
`dvc exp show` lists each experiment's planned r_a, N, tokens, epochs and FLOPs per token.

One row per run: the concrete architecture the planner chose, its total and active parameters
(non-vocab, the study's N, and with embeddings, the published convention), how far they are from
the targets, its FLOPs per token, token budget T_i = C / F_i, steps and epochs of the unique data U:
the replay plan the shard builder consumes, readable before anything trains. It plans from the
params file alone (the same `plan_run` as each plan@run stage, without the corpus check), so it has
no data dependency and also serves studies that are only planned:
`python -m stages.plan_table studies/paper_2b.yaml` (= `python -m stages.plan_table FILE`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from moe_study.accounting import dense_width, plan_run
from moe_study.config.schema import Params
from moe_study.io import write_bytes, write_json

# (column, how to read it from a plan dict, markdown format)
COLUMNS: list[tuple[str, Any, str]] = [
    ("run", lambda p: p["run"], "{}"),
    ("kind", lambda p: p["arch"]["kind"], "{}"),
    ("design", lambda p: p.get("design"), "{}"),
    ("experts", lambda p: p["arch"]["experts"], "{}"),
    ("top_k", lambda p: p["arch"]["top_k"], "{}"),
    ("expert_width", lambda p: p["arch"]["ffn_hidden"] if p["arch"]["kind"] == "moe" else None, "{}"),
    ("shared_experts", lambda p: p["arch"].get("shared_experts", 0), "{}"),
    ("shared_width", lambda p: ((p["arch"].get("shared_ffn_hidden") or p["arch"]["ffn_hidden"])
                                if p["arch"]["kind"] == "moe" and p["arch"].get("shared_experts") else None), "{}"),
    # granularity G = dense reference FFN width / routed expert width (Krajewski et al. 2024)
    ("granularity", lambda p: (p["dense_reference_ffn"] / p["arch"]["ffn_hidden"]
                               if p["arch"]["kind"] == "moe" and p.get("dense_reference_ffn") else None), "{:.2f}"),
    ("dense_ffn", lambda p: (p["arch"]["ffn_hidden"] if p["arch"]["kind"] == "dense"
                             else p["arch"].get("dense_ffn_hidden")), "{}"),
    ("nonvocab_params", lambda p: p["nonvocab_params"], "{:,}"),
    ("params_rel_dev", lambda p: p.get("params_rel_dev"), "{:+.2%}"),
    ("nonvocab_active", lambda p: p["nonvocab_active"], "{:,}"),
    ("activation_rate", lambda p: p["activation_rate"], "{:.4f}"),
    ("target_rate", lambda p: p.get("target_activation_rate"), "{:.3f}"),
    ("rate_rel_dev", lambda p: p.get("rate_rel_dev"), "{:+.2%}"),
    ("total_params", lambda p: p.get("total_params"), "{:,}"),
    ("active_params", lambda p: p.get("active_params"), "{:,}"),
    ("flops_per_token", lambda p: p.get("flops_per_token"), "{:.4g}"),
    ("flops_per_token_exact", lambda p: p.get("flops_per_token_exact"), "{:.4g}"),
    ("tokens", lambda p: p["tokens"], "{:,}"),
    ("steps", lambda p: p["steps"], "{:,}"),
    ("epochs", lambda p: p["epochs"], "{:.3f}"),
    ("compute_used", lambda p: p.get("compute_used"), "{:.4g}"),
]


# a study of several sizes (budget.sizes) or with runs at a multiple of C (runs.<name>.compute_scale) also shows
# each run's size, shape, compute and LM-head share (after `kind`); one-size studies keep the columns above
SIZE_COLUMNS: list[tuple[str, Any, str]] = [
    ("size", lambda p: p.get("size"), "{}"),
    ("d_model", lambda p: p["arch"]["d_model"], "{}"),
    ("n_layers", lambda p: p["arch"]["n_layers"], "{}"),
    ("compute", lambda p: p["compute"], "{:.4g}"),
    ("compute_scale", lambda p: p.get("compute_scale", 1.0), "{:g}"),
    ("lm_head_share", lambda p: p.get("lm_head_flops_share"), "{:.1%}"),
]


def columns_for(p: Params) -> list[tuple[str, Any, str]]:
    """The table's columns: COLUMNS, with SIZE_COLUMNS after `kind` when the study has sizes or scaled runs."""
    if not p.budget.sizes and all(r.compute_scale == 1 for r in p.runs.values()):
        return COLUMNS
    return COLUMNS[:2] + SIZE_COLUMNS + COLUMNS[2:]


def table_paths(study: str, root: Path = Path("results")) -> tuple[Path, Path]:
    return root / study / "plan.parquet", root / study / "plan.md"


SUMMARY_KEYS = ("activation_rate", "nonvocab_params", "tokens", "epochs", "flops_per_token")


def summary(plans: list[dict]) -> dict:
    """A few figures per run for `dvc exp show` (results/<study>/plan_metrics.json, a DVC metric)."""
    return {"runs": {p["run"]: {k: p[k] for k in SUMMARY_KEYS} for p in plans},
            "max_abs_params_rel_dev": max(abs(p["params_rel_dev"]) for p in plans),
            "max_abs_rate_rel_dev": max((abs(p["rate_rel_dev"]) for p in plans if p["rate_rel_dev"] is not None),
                                        default=0.0)}


def plans_from_params(p: Params) -> list[dict]:
    """Plan every run from the params alone (no corpus needed), with the dense reference's FFN width
    (for the granularity column) and each run's MoE design (budget.design or runs.<name>.design)."""
    def f_dense(r: str) -> int:
        model, params, _ = p.run_size(r)
        return dense_width(model, params, p.tokenizer.vocab_size, p.budget.count_embeddings)

    return [plan_run(p, r).to_dict() | {"dense_reference_ffn": f_dense(r),
                                        "design": (p.run(r).design or p.budget.design) if p.run(r).kind == "moe"
                                        else None}
            for r in sorted(p.runs)]


def rows(plans: list[dict], columns: list[tuple[str, Any, str]] = COLUMNS) -> list[dict]:
    return [{name: get(plan) for name, get, _ in columns} for plan in plans]


def parquet_bytes(table_rows: list[dict], columns: list[tuple[str, Any, str]] = COLUMNS) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {name: [r[name] for r in table_rows] for name, _, _ in columns}
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


def markdown(p: Params, table_rows: list[dict]) -> str:
    b = pl = p.budget
    columns = columns_for(p)
    sizes = "".join(
        f" Size `{n}`: N = {z.params:,.0f}, C = {z.compute:.4g}"
        + (f", model {', '.join(f'{k} {v}' for k, v in z.model.items())}" if z.model else "") + "."
        for n, z in b.sizes.items())
    head = [
        f"# Plan of study `{p.study}`",
        "",
        f"Budget: N = {b.params:,.0f} params ({pl.count_embeddings}), C = {b.compute:.4g} FLOPs, "
        f"U = {b.unique_tokens:,} unique tokens. Compute convention `{pl.compute_convention}` "
        f"(T_i = C / flops_per_token_i); tolerances: N ±{pl.params_tol:.0%}, r_a ±{pl.rate_tol:.0%} relative. "
        f"Model family: d_model {p.model.d_model}, {p.model.n_layers} layers, {p.model.n_heads} heads"
        f"{f' ({p.model.n_kv_heads} kv)' if p.model.n_kv_heads else ''}, seq_len {p.model.seq_len}, "
        f"vocab {p.tokenizer.vocab_size}. total/active_params count embeddings (the published convention); "
        "flops_per_token_exact includes the LM head. granularity = dense reference FFN width / routed expert "
        "width; shared_width = the width of one shared expert (design `paper`: top_k x the routed width). "
        "Formulas: moe_study/accounting.py." + (f" Runs with a `size` use its budget and model:{sizes}" if sizes
                                                  else ""),
        "",
        "| " + " | ".join(name for name, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    body = []
    for r in table_rows:
        cells = ["" if r[name] is None else fmt.format(r[name]) for name, _, fmt in columns]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + body) + "\n"


def write_table(p: Params, plans: list[dict], root: Path = Path("results")) -> tuple[Path, Path]:
    pq_path, md_path = table_paths(p.study, root)
    columns = columns_for(p)
    r = rows(plans, columns)
    write_bytes(pq_path, parquet_bytes(r, columns))
    write_bytes(md_path, markdown(p, r).encode())
    write_json(pq_path.parent / "plan_metrics.json", summary(plans))
    return pq_path, md_path
