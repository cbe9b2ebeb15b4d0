"""aggregate: every run's plan and held-out evaluation into DuckDB, a table and a plot.

The unit of comparison is a *group* (a run name, or `runs.<name>.group` for seeds of one point):
its mean held-out loss and bits per byte with a 95% interval, the bootstrap interval of a single
run or a t-interval over seeds when a group has several. The table is what `make study` prints.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path

from stages.common import WORK, atomic_path, fail, read_json, setup_logging, sha256_file, write_bytes, write_json
from stages.schema import Params, ParamsError, load_params

EVAL_DIR = WORK / "eval"
METRIC_KEYS = ("bpb", "bpb_lo", "bpb_hi", "loss", "activation_rate", "tokens", "epochs")  # for `dvc exp show`

# (column, SQL type, where it is in an evaluation JSON)
COLUMNS: list[tuple[str, str]] = [
    ("run", "VARCHAR"),
    ("grp", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("seed", "INTEGER"),
    ("lr", "DOUBLE"),
    ("activation_rate", "DOUBLE"),
    ("nonvocab_params", "BIGINT"),
    ("nonvocab_active", "BIGINT"),
    ("experts", "INTEGER"),
    ("top_k", "INTEGER"),
    ("ffn_hidden", "INTEGER"),
    ("tokens", "BIGINT"),
    ("unique_tokens", "BIGINT"),
    ("epochs", "DOUBLE"),
    ("compute", "DOUBLE"),
    ("loss", "DOUBLE"),
    ("loss_lo", "DOUBLE"),
    ("loss_hi", "DOUBLE"),
    ("bpb", "DOUBLE"),
    ("bpb_lo", "DOUBLE"),
    ("bpb_hi", "DOUBLE"),
    ("eval_tokens", "BIGINT"),
    ("eval_bytes", "BIGINT"),
    ("eval_sha256", "VARCHAR"),
]


def run_row(p: Params, run: str, path: Path) -> dict:
    """Flatten one evaluation JSON (written by stages/evaluate.py) into a table row."""
    e = read_json(path)
    plan = e["plan"]
    loss_ci = e.get("loss_ci") or [e["loss"], e["loss"]]  # null when eval.bootstrap = 0
    bpb_ci = e.get("bpb_ci") or [e["bpb"], e["bpb"]]
    arch = plan["arch"]
    return {
        "run": run,
        "grp": p.run(run).group or run,
        "kind": arch["kind"],
        "seed": p.run_seed(run),
        "lr": p.run_lr(run),
        "activation_rate": plan["activation_rate"],
        "nonvocab_params": plan["nonvocab_params"],
        "nonvocab_active": plan["nonvocab_active"],
        "experts": arch["experts"],
        "top_k": arch["top_k"],
        "ffn_hidden": arch["ffn_hidden"],
        "tokens": plan["tokens"],
        "unique_tokens": plan["unique_tokens"],
        "epochs": plan["epochs"],
        "compute": plan["compute"],
        "loss": e["loss"],
        "loss_lo": loss_ci[0],
        "loss_hi": loss_ci[1],
        "bpb": e["bpb"],
        "bpb_lo": bpb_ci[0],
        "bpb_hi": bpb_ci[1],
        "eval_tokens": e["tokens"],
        "eval_bytes": e["bytes"],
        "eval_sha256": sha256_file(path),
    }


def _t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n-1 degrees of freedom.

    Exact table up to 10 samples; beyond, the Cornish-Fisher expansion around z = 1.95996 (error
    < 1e-3 from 10 degrees of freedom on), so 11-30 seeds do not get the too-narrow normal interval.
    """
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    if n in table:
        return table[n]
    z, v = 1.959964, n - 1
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per group: mean of its seeds, interval over seeds (or the run's bootstrap if alone)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["grp"], []).append(r)
    out = []
    for name, rs in groups.items():
        g = dict(rs[0], grp=name, seeds=len(rs))
        for m in ("loss", "bpb"):
            vals = [r[m] for r in rs]
            g[m] = statistics.fmean(vals)
            if len(rs) > 1:
                half = _t95(len(rs)) * statistics.stdev(vals) / math.sqrt(len(rs))
                g[f"{m}_lo"], g[f"{m}_hi"] = g[m] - half, g[m] + half
        out.append(g)
    dense = [g for g in out if g["kind"] == "dense"]
    base = min(dense, key=lambda g: g["bpb"])["bpb"] if dense else None
    for g in out:
        g["bpb_vs_dense"] = (g["bpb"] - base) if base is not None else None
    return sorted(out, key=lambda g: (-g["activation_rate"], g["grp"]))


def markdown_table(groups: list[dict], study: str) -> str:
    head = ("| group | kind | seeds | r_a | N (non-vocab) | N_active | experts/top-k | tokens | epochs "
            "| held-out loss [95% CI] | bits/byte [95% CI] | Δ bpb vs dense |")
    lines = [f"# Study `{study}`: dense vs MoE at equal N, C and U", "", head, "|" + "---|" * 12]
    for g in groups:
        ek = f"{g['experts']}/{g['top_k']}" if g["kind"] == "moe" else "-"
        delta = "-" if g["bpb_vs_dense"] is None else f"{g['bpb_vs_dense']:+.4f}"
        lines.append(
            f"| {g['grp']} | {g['kind']} | {g['seeds']} | {g['activation_rate']:.3f} | {g['nonvocab_params']:,} "
            f"| {g['nonvocab_active']:,} | {ek} | {g['tokens']:,} | {g['epochs']:.2f} "
            f"| {g['loss']:.4f} [{g['loss_lo']:.4f}, {g['loss_hi']:.4f}] "
            f"| {g['bpb']:.4f} [{g['bpb_lo']:.4f}, {g['bpb_hi']:.4f}] | {delta} |"
        )
    lines += ["", "Equal resources: every run has the same non-vocab params N, compute C = 6·N_active·T and "
              "unique tokens U; MoE runs read U for more epochs. Intervals: bootstrap over held-out documents "
              "for one seed, Student-t over seeds otherwise.", "",
              "Made by `python -m stages.aggregate` as the last stage of `dvc repro` / `snakemake` (`make study` for "
              "the default params.yaml); dvc.lock records the hashes of every input."]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    cols = [c for c, _ in COLUMNS]
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join("" if r[c] is None else (f"{r[c]:.10g}" if isinstance(r[c], float) else str(r[c]))
                              for c in cols))
    return "\n".join(lines) + "\n"


def write_duckdb(dest: Path, rows: list[dict]) -> None:
    import duckdb

    with atomic_path(dest) as tmp:
        con = duckdb.connect(str(tmp))
        con.execute(f"CREATE TABLE runs ({', '.join(f'{c} {t}' for c, t in COLUMNS)})")
        con.executemany(f"INSERT INTO runs VALUES ({', '.join('?' for _ in COLUMNS)})",
                        [[r[c] for c, _ in COLUMNS] for r in rows])
        con.execute("""
            CREATE VIEW groups AS
            SELECT grp, any_value(kind) AS kind, avg(activation_rate) AS activation_rate, count(*) AS seeds,
                   avg(loss) AS loss, stddev_samp(loss) AS loss_sd, avg(bpb) AS bpb, stddev_samp(bpb) AS bpb_sd,
                   avg(tokens) AS tokens, avg(epochs) AS epochs
            FROM runs GROUP BY grp ORDER BY activation_rate DESC""")
        con.close()


def plot(dest: Path, groups: list[dict], study: str) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(groups, key=lambda g: g["activation_rate"])  # dense sits at r_a = 1
    dense = [g for g in groups if g["kind"] == "dense"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for kind, marker in (("moe", "o"), ("dense", "s")):
        sel = [g for g in pts if g["kind"] == kind]
        if sel:
            ax.errorbar([g["activation_rate"] for g in sel], [g["bpb"] for g in sel],
                        yerr=[[g["bpb"] - g["bpb_lo"] for g in sel], [g["bpb_hi"] - g["bpb"] for g in sel]],
                        marker=marker, capsize=3, ls="-" if kind == "moe" else "none", label=kind)
            for g in sel:
                ax.annotate(g["grp"], (g["activation_rate"], g["bpb"]), textcoords="offset points", xytext=(5, 5),
                            fontsize=7)
    for g in dense:
        ax.axhline(g["bpb"], color="k", ls="--", lw=1)
        ax.axhspan(g["bpb_lo"], g["bpb_hi"], color="k", alpha=0.08)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sorted({round(g["activation_rate"], 3) for g in pts}))
    ax.set_xlabel("activation rate r_a = N_active / N")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"{study}: equal N, compute and unique data")
    ax.legend()
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: reproducible bytes
    plt.close(fig)


def aggregate(p: Params, eval_dir: Path = EVAL_DIR, results: Path | None = None) -> str:
    results = results or Path("results") / p.study
    missing = [r for r in p.runs if not (eval_dir / f"{r}.json").exists()]
    if missing:
        raise FileNotFoundError(f"no evaluation for runs {missing} in {eval_dir} (run the evaluate stage)")
    rows = [run_row(p, r, eval_dir / f"{r}.json") for r in sorted(p.runs)]
    groups = group_rows(rows)
    table = markdown_table(groups, p.study)
    write_duckdb(results / "metrics.duckdb", rows)
    write_bytes(results / "results.csv", csv_text(rows).encode())
    write_bytes(results / "results.md", table.encode())
    write_json(results / "metrics.json", {r["run"]: {k: r[k] for k in METRIC_KEYS} for r in rows})
    plot(results / "loss_vs_activation.png", groups, p.study)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    setup_logging("aggregate")
    try:
        p = load_params(a.params)
        table = aggregate(p)
    except (ParamsError, FileNotFoundError, KeyError, ValueError) as err:
        fail(str(err))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
