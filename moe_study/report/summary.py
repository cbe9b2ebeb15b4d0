"""The study report: summary.md (tables readable on GitHub), results.csv and the PNG plots.

Kept apart from stages/aggregate.py (the database) so the presentation can change without
touching the queries. Plots are written without a version stamp, so the same rows give the same
bytes: the paper's key figure (held-out loss vs activation rate, one line per model size, dense
as a horizontal reference), the training curves and the expert-load balance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_study.accounting import AUDIT_TOLERANCE
from moe_study.io import atomic_path

CSV_COLUMNS = ("run_id", "study", "grp", "kind", "seed", "lr", "size", "total_params", "active_params",
               "activation_rate", "experts", "top_k", "shared_experts", "compute_budget", "compute_convention",
               "train_flops", "train_flops_exact", "tokens_seen", "unique_tokens", "epochs", "final_train_loss",
               "val_loss", "val_loss_lo", "val_loss_hi", "val_bpb", "val_bpb_lo", "val_bpb_hi", "cloze_acc",
               "cloze_lo", "cloze_hi", "choice_acc", "choice_lo", "choice_hi", "audit_max_dev", "audit_ok",
               "params_sha256")


# ----------------------------------------------------------------------------------------- tables
def _f(v: Any, fmt: str = ".4f", none: str = "-") -> str:
    """`v` in `fmt`; a float that rounds to zero prints as +0.0000, never -0.0000 (format's `z`)."""
    if v is None:
        return none
    if isinstance(v, float) and fmt.endswith("f") and "z" not in fmt:
        sign = 1 if fmt[:1] in ("+", "-", " ") else 0
        fmt = f"{fmt[:sign]}z{fmt[sign:]}"
    return format(v, fmt)


def _ci(g: dict[str, Any], m: str, lo: str, hi: str, fmt: str = ".4f") -> str:
    if g.get(m) is None:
        return "-"
    return f"{g[m]:{fmt}} [{_f(g.get(lo), fmt)}, {_f(g.get(hi), fmt)}]"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"×{v:.3f}"


def _verdict(d: dict[str, Any], m: str) -> str:
    """Whether the Δ interval excludes 0, in words (Δ < 0: MoE lower loss, i.e. better)."""
    ex = d.get(f"d_{m}_excludes_zero")
    if ex is None:
        return "no interval"
    if not ex:
        return "no (interval spans 0)"
    return "yes: MoE better" if d[f"d_{m}"] < 0 else "yes: dense better"


def _dci(d: dict[str, Any], m: str) -> str:
    return f"{_f(d.get(f'd_{m}'), '+.4f')} [{_f(d.get(f'd_{m}_lo'), '+.4f')}, {_f(d.get(f'd_{m}_hi'), '+.4f')}]"


def answer(group_deltas: Sequence[dict[str, Any]]) -> list[str]:
    """The study's answer in plain words, one line per MoE group: does it beat the dense baseline in held-out
    bits/byte beyond the 95% interval of the difference (each arm at its best learning rate)?"""
    if not group_deltas:
        return ["Answer: no MoE group has a dense baseline at the same N, C and U here."]
    lines = ["Answer (held-out bits/byte, each arm at its best learning rate; Δ = MoE − dense, < 0: MoE better):"]
    for d in group_deltas:
        verdict = _verdict(d, "val_bpb")
        plain = {"yes: MoE better": "**MoE beats dense** beyond the interval",
                 "yes: dense better": "**dense beats MoE** beyond the interval",
                 "no (interval spans 0)": "**no difference** beyond the interval (it spans 0)"}.get(verdict, verdict)
        lines.append(f"- {d['grp']} (r_a {d['activation_rate']:.3f}, {d['seeds']} seed(s)): {plain}; Δ bpb "
                     f"{_dci(d, 'val_bpb')} ({d['ci_method'] or 'no interval'}).")
    return lines


def _group_delta_table(title: str, deltas: Sequence[dict[str, Any]],
                       middle: Sequence[tuple[str, Callable[[dict[str, Any]], str]]]) -> list[str]:
    """A section of group-vs-dense rows (tables `group_vs_dense` and `group_vs_dense_other_compute`): group,
    r_a, the `middle` columns (header, cell), then the dense runs, both Δs with intervals and the verdict."""
    heads = ["group", "r_a", *(h for h, _ in middle), "dense runs", "Δ loss [95% CI]", "Δ bpb [95% CI]", "interval",
             "Δ bpb excludes 0?"]
    lines = ["", f"## {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for d in deltas:
        cells = [d["grp"], f"{d['activation_rate']:.3f}", *(cell(d) for _, cell in middle), d["dense_run_ids"],
                 _dci(d, "val_loss"), _dci(d, "val_bpb"), d["ci_method"] or "-", _verdict(d, "val_bpb")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(study: str, groups: list[dict[str, Any]], moe_vs_dense: list[dict[str, Any]],
                     status: dict[str, Any], runs: list[dict[str, Any]],
                     group_deltas: Sequence[dict[str, Any]] = (), lr_choice: Sequence[dict[str, Any]] = (),
                     exact_vs_dense: dict[str, float | None] | None = None,
                     other_compute: Sequence[dict[str, Any]] = ()) -> str:
    """The study report. `exact_vs_dense`: each run's train_flops_exact over its `dense_baseline`'s
    (moe_study.report.aggregate.exact_vs_dense), shown per run. `other_compute`: the rows of table
    `group_vs_dense_other_compute` (each MoE group vs dense at another budget of its N and U, e.g. 2C)."""
    lines = [f"# Study `{study}`: dense vs MoE at equal N, C and U", ""]
    conventions = ", ".join(sorted({str(r["compute_convention"]) for r in runs})) or "-"
    exact_ratio = exact_vs_dense or {}
    equalised = [f"Compute equalised: training FLOPs in the `{conventions}` convention"
              + {"exact": " (every matmul, LM head and attention scores included: the real compute).",
                 "nonvocab": " (the paper's: the LM head is not counted, so the real compute differs between "
                 "runs; see the exact FLOPs vs dense below).",
                 "6n": " (6 N_active per token: the LM head and attention scores are not counted; see the exact "
                 "FLOPs vs dense below)."}.get(conventions, ".")]
    if status["status"] == "ok":
        audited = status["audited_runs"]
        lines.append(f"Status: **ok** ({audited} of {status['runs']} runs audited against their plan"
                     + (f", largest deviation {100 * status['audit_max_dev']:.3f}%)." if audited else ")."))
    else:
        lines.append(f"Status: **FAILED**: runs {status['audit_failed_runs']} deviate from their planned N, "
                     f"N_active, tokens or FLOPs by more than {100 * AUDIT_TOLERANCE:g}% "
                     f"(largest {100 * status['audit_max_dev']:.2f}%).")
    grid = any(c["grid"] > 1 for c in lr_choice)
    at_best = ", each at its best learning rate on the validation split)" if grid else ")"
    lines += ["", *answer(group_deltas), "", *equalised, "", "## Groups (mean over seeds" + at_best, "",
              "| group | kind | seeds | r_a | N (non-vocab) | N_active | experts/top-k | tokens | epochs "
              "| held-out loss [95% CI] | bits/byte [95% CI] | Δ bpb vs dense | cloze acc [95% CI] "
              "| choice acc [95% CI] |",
              "|" + "---|" * 14]
    for g in groups:
        ek = f"{g['experts']}/{g['top_k']}" if g["kind"] == "moe" else "-"
        lines.append(
            f"| {g['grp']} | {g['kind']} | {g['seeds']} | {g['activation_rate']:.3f} | {g['total_params']:,} "
            f"| {g['active_params']:,} | {ek} | {g['tokens_seen']:,.0f} | {g['epochs']:.2f} "
            f"| {_ci(g, 'val_loss', 'val_loss_lo', 'val_loss_hi')} | {_ci(g, 'val_bpb', 'val_bpb_lo', 'val_bpb_hi')} "
            f"| {_f(g['bpb_vs_dense'], '+.4f')} | {_ci(g, 'cloze_acc', 'cloze_lo', 'cloze_hi', '.3f')} "
            f"| {_ci(g, 'choice_acc', 'choice_lo', 'choice_hi', '.3f')} |")
    if group_deltas:
        lines += _group_delta_table(
            "MoE vs dense, per group (table `group_vs_dense`; Δ < 0: MoE lower loss)", group_deltas,
            [("lr", lambda d: f"{d['lr']:.3g}"), ("seeds", lambda d: str(d["seeds"]))])
    if other_compute:
        lines += _group_delta_table(
            "MoE vs dense at another compute budget of the same N and U (table `group_vs_dense_other_compute`; "
            "e.g. dense at 2C, which reads U twice; Δ < 0: MoE lower loss)", other_compute,
            [("seeds", lambda d: str(d["seeds"])), ("dense compute", lambda d: f"×{d['compute_ratio']:.3g}")])
    if moe_vs_dense:
        lines += ["", "## Each MoE run vs its dense baseline (view `moe_vs_dense`; paired bootstrap over held-out "
                  "documents)", "",
                  "| run | r_a | experts/top-k | lr | tokens vs dense | exact FLOPs vs dense | Δ loss [95% CI] "
                  "| Δ bpb [95% CI] | Δ bpb excludes 0? | Δ cloze acc | Δ choice acc | dense runs |", "|" + "---|" * 12]
        for m in moe_vs_dense:
            lines.append(
                f"| {m['run_id']} | {m['activation_rate']:.3f} | {m['experts']}/{m['top_k']} "
                f"| {m['lr']:.3g}{'' if m['at_best_lr'] else ' (not best)'} "
                f"| ×{m['tokens_seen'] / m['dense_tokens_seen']:.2f} | {_ratio(m.get('flops_exact_vs_dense'))} "
                f"| {_dci(m, 'val_loss')} "
                f"| {_dci(m, 'val_bpb')} | {_verdict(m, 'val_bpb')} | {_f(m['d_cloze_acc'], '+.3f')} "
                f"| {_f(m['d_choice_acc'], '+.3f')} | {m['dense_run_ids']} |")
    if grid:
        lines += ["", "## Learning-rate grid (table `lr_choice`: picked on the validation split, reported on held-out)",
                  "", "| group | lr | runs | validation loss | validation bpb | held-out loss | held-out bpb | best |",
                  "|" + "---|" * 8]
        for c in lr_choice:
            lines.append(f"| {c['grp']} | {c['lr']:.3g} | {c['runs']} | {_f(c['validation_loss'])} "
                         f"| {_f(c['validation_bpb'])} | {_f(c['val_loss'])} | {_f(c['val_bpb'])} "
                         f"| {'**best**' if c['best'] else ''} |")
    lines += ["", "## Runs", "",
              "| run | group | seed | lr | train FLOPs | exact FLOPs (× dense) | tokens | val loss | bits/byte "
              "| cloze | choice | audit max dev | params sha256 |", "|" + "---|" * 13]
    for r in runs:
        audit = "-" if r["audit_max_dev"] is None else f"{100 * r['audit_max_dev']:.3f}%" + (
            "" if r["audit_ok"] else " FAIL")
        lines.append(
            f"| {r['run_id']} | {r['grp']} | {r['seed']} | {r['lr']:.3g} | {r['train_flops']:.3e} "
            f"| {_f(r.get('train_flops_exact'), '.3e')} ({_ratio(exact_ratio.get(r['run_id']))}) "
            f"| {r['tokens_seen']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {_f(r['cloze_acc'], '.3f')} "
            f"| {_f(r['choice_acc'], '.3f')} | {audit} | `{r['params_sha256'][:12]}` |")
    lines += ["", "![held-out loss vs activation rate](loss_vs_activation.png)", "",
              "![training curves](training_curves.png) ![expert load](expert_load.png)", "",
              "Equal resources: every run has the same non-vocab params N, compute C = F·T (F = training FLOPs per "
              f"token in the `{conventions}` convention of moe_study/accounting.py: `train FLOPs`) and unique tokens "
              "U; `exact FLOPs` counts every matmul (LM head, attention scores) x tokens read, whatever the "
              "convention, with its ratio to the dense baseline's. MoE runs read U for more epochs. Loss "
              "intervals: bootstrap over held-out documents for one seed, "
              "Student-t over seeds otherwise. Δ vs dense: minus the dense baseline (view `dense_baseline`), the mean "
              "over every dense run (each seed once) of the same N, C and U, each group at its best learning rate "
              "(lowest validation loss; the validation split is not the held-out test split). Δ intervals (95%): "
              "Welch over seeds when both arms have >= 2 seeds, else a paired bootstrap over the held-out documents "
              "that every run scores (document sampling only); seeds > 0 vary the data order as well as the init "
              "(train.vary_data_order). Bits per byte count each document's closing EOS in the nats and as one "
              "byte. Task accuracies (stages/tasks.py): "
              "cloze = greedy sentence-final word, choice = 4-way continuation by log-likelihood per byte "
              "(chance 0.25); Wilson intervals for one seed.",
              "",
              "Made by `python -m stages.aggregate` as the last stage of `dvc repro` / `snakemake` (`make study` for "
              "the default params.yaml) from `metrics.duckdb` beside this file; dvc.lock records the hashes of every "
              "input."]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    out = [",".join(CSV_COLUMNS)]
    for r in rows:
        out.append(",".join("" if r[c] is None else (f"{r[c]:.10g}" if isinstance(r[c], float) else str(r[c]))
                            for c in CSV_COLUMNS))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, dest: Path) -> None:
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: reproducible bytes
    _pyplot().close(fig)


def _spaced_ticks(rates: list[float], min_ratio: float = 1.12) -> list[float]:
    """The rates rounded to 3 digits, dropping any within `min_ratio` of the tick before it: two sizes'
    designs give nearly the same rates (0.206 and 0.208), whose labels would print over each other."""
    ticks: list[float] = []
    for r in sorted({round(r, 3) for r in rates if r > 0}):
        if not ticks or r / ticks[-1] >= min_ratio:
            ticks.append(r)
        elif r == 1.0:  # the dense rate always has its tick
            ticks[-1] = r
    return ticks


def _percent(x: float, _pos: object = None) -> str:
    return f"{100 * x:.2g}%" if x < 0.1 else f"{round(100 * x)}%"


def plot_loss_vs_activation(dest: Path, groups: list[dict[str, Any]], study: str) -> None:
    """Held-out loss (and bits per byte) vs r_a: one line per size; its dense groups as horizontal lines,
    dashed at the MoE runs' compute (C) and dotted at any other budget (e.g. 2C)."""
    import matplotlib.ticker

    plt = _pyplot()
    sizes = sorted({g["size"] for g in groups})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, (m, lo, hi, label) in zip(axes, (("val_loss", "val_loss_lo", "val_loss_hi", "held-out loss (nats/token)"),
                                              ("val_bpb", "val_bpb_lo", "val_bpb_hi", "held-out bits per byte")),
                                      strict=True):
        for i, size in enumerate(sizes):
            c = colors[i % len(colors)]
            moe = sorted((g for g in groups if g["size"] == size and g["kind"] == "moe"),
                         key=lambda g: g["activation_rate"])
            dense = [g for g in groups if g["size"] == size and g["kind"] == "dense"]
            if moe:
                ax.errorbar([g["activation_rate"] for g in moe], [g[m] for g in moe],
                            yerr=[[g[m] - g[lo] for g in moe], [g[hi] - g[m] for g in moe]], color=c, marker="o",
                            capsize=3, label=f"MoE, N = {size:,.0f}")
                for g in moe:  # sizes' labels alternate above / below their points: the rates nearly coincide
                    ax.annotate(g["grp"], (g["activation_rate"], g[m]), textcoords="offset points",
                                xytext=(5, 5 if i % 2 == 0 else -11), fontsize=7)
            c_size = min(g["compute_budget"] for g in groups if g["size"] == size)  # the size's budget C
            for d in dense:
                ratio = d["compute_budget"] / c_size
                at = "C" if math.isclose(ratio, 1.0, rel_tol=0.01) else f"{ratio:.3g}C"
                ax.axhline(d[m], color=c, ls="--" if at == "C" else ":", lw=1,
                           label=f"dense at {at}, N = {size:,.0f} ({d['grp']})")
                ax.axhspan(d[lo], d[hi], color=c, alpha=0.1)
                ax.plot([1.0], [d[m]], marker="s" if at == "C" else "D", color=c)
        ax.set_xscale("log")
        ax.set_xticks(_spaced_ticks([g["activation_rate"] for g in groups] + [1.0]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_percent))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("activation rate r_a = N_active / N")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{study}: equal N, compute and unique data (95% intervals)")
    _save(fig, dest)


def plot_training_curves(dest: Path, runs: list[dict[str, Any]], steps: list[dict[str, Any]], study: str) -> None:
    """Training loss vs tokens seen, one colour per group: each run's per-step loss faint, and its trailing
    mean over 2% of its steps drawn over it (a step's loss varies with the documents in its batch: on a
    corpus of files of very different kinds, by ±1 nat, which hides the curves' differences)."""
    import numpy as np

    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    grp_of = {r["run_id"]: r["grp"] for r in runs}
    grps = sorted(set(grp_of.values()))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    seen: set[str] = set()
    for run in sorted(grp_of):
        pts = [s for s in steps if s["run_id"] == run and s["loss"] is not None]
        if not pts:
            continue
        g = grp_of[run]
        color = colors[grps.index(g) % len(colors)]
        tokens, loss = np.array([s["tokens"] for s in pts]), np.array([s["loss"] for s in pts], dtype=float)
        k = max(1, len(loss) // 50)
        mean = np.convolve(loss, np.ones(k) / k, mode="valid")  # mean[i] = mean of loss[i .. i+k-1]
        if k > 1:
            ax.plot(tokens, loss, lw=0.4, alpha=0.2, color=color)
        ax.plot(tokens[k - 1:], mean, lw=1.0, color=color, label=None if g in seen else g)
        seen.add(g)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"{study}: training curves (faint: each step; line: mean of the last 2% of steps)", fontsize=9)
    if seen:
        ax.legend(fontsize=7)
    _save(fig, dest)


def plot_expert_load(dest: Path, runs: list[dict[str, Any]], load: list[dict[str, Any]], study: str) -> None:
    """Per MoE run: routed fraction of each expert relative to uniform (1.0), one bar series per layer."""
    import matplotlib.ticker

    plt = _pyplot()
    moe = [r["run_id"] for r in runs if any(x["run_id"] == r["run_id"] for x in load)]
    cols = max(1, min(3, len(moe)))
    nrows = max(1, -(-len(moe) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), dpi=120, squeeze=False)
    for ax in axes.flat[len(moe):]:
        ax.axis("off")
    if not moe:
        axes.flat[0].text(0.5, 0.5, "no MoE runs", ha="center", va="center")
    for ax, run in zip(axes.flat, moe, strict=False):
        rows = [x for x in load if x["run_id"] == run]
        layers = sorted({x["layer"] for x in rows})
        width = 0.8 / len(layers)
        for li, layer in enumerate(layers):
            pts = [x for x in rows if x["layer"] == layer]
            ax.bar([x["expert"] + (li - (len(layers) - 1) / 2) * width for x in pts],
                   [x["over_uniform"] for x in pts], width=width, label=f"layer {layer}")
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("load / uniform")
        ax.legend(fontsize=6)
    fig.suptitle(f"{study}: expert load over training (1 = balanced)")
    _save(fig, dest)
