"""Carry a study's learning-rate choice from its grid runs to the runs that train at the chosen lr.

Why: a study such as studies/gpu_study.yaml tunes lr on a grid at seed 0 of each group of the smaller
size (`lr_grid`, expanded into runs `<name>_lr<value>`), then trains the other seeds, and the larger size,
at each group's chosen lr. Those runs need a plain `lr:` in the study file (params are static: DVC and
Snakemake key every output on them), so the choice must be written into the file, and the commit that does
it is the record of which lr each run got and why. By hand that is ~40 edits from a table; this module makes
them from the committed records, with the same rule the aggregate reports (`report.aggregate.choose_lr`:
the lowest mean validation loss; the held-out split is never looked at), and refuses while a grid is
incomplete.

Which grid a run follows: its own group when that group has a grid; otherwise the grid group of the same
kind and compute scale at the nearest activation rate (the planned r_a; dense is 1), e.g. the larger size's
l_r08 (r_a 0.083) follows s_r09 (0.088). `python -m moe_study.remote choose-lr --study FILE` prints the
table; `--write` edits each such run's `lr:` in the file (its one line, comments kept) and writes
results/<study>/lr_choice.md. The rule is implicit: in a study with a grid, a run of the same kind and
compute scale whose lr was set by hand to something else is held back by `remote todo` (pending_runs says
why); run it with `--runs`, or give it a grid of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from moe_study.accounting import plan_run
from moe_study.config.load import load_params
from moe_study.config.schema import Params, ParamsError
from moe_study.io import ClearError, atomic_path, write_bytes
from moe_study.remote.records import done_runs, records_dir
from moe_study.report.aggregate import choose_lr


class LrChoiceError(ClearError):
    """The choice cannot be made or written (names the group, run or file)."""


@dataclass(frozen=True)
class Grid:
    group: str
    kind: str
    compute_scale: float
    activation_rate: float
    runs: tuple[str, ...]  # the grid's runs (one per lr, seeds aside)
    rows: tuple[dict[str, Any], ...]  # choose_lr's rows of the group; empty while a run has no record

    @property
    def best(self) -> float | None:
        return next((r["lr"] for r in self.rows if r["best"]), None)


def _key(p: Params, run: str) -> tuple[str, float, float]:
    spec = p.runs[run]
    return spec.kind, float(spec.compute_scale), float(plan_run(p, run).arch.activation_rate)


def _run_rows(p: Params, runs: tuple[str, ...], done: set[str], results: Path | None, collect: Path | None
              ) -> list[dict[str, Any]] | None:
    """Each run's row (run.parquet) from its committed record (`done`: the runs that have a current one),
    else from `collect` (the collect stage's work/collect/<run>/ on the machine that trained it); None
    while one of them has neither."""
    paths = []
    for r in runs:
        if r in done:
            paths.append(records_dir(p, results) / r / "run.parquet")
        elif collect is not None and (collect / r / "run.parquet").is_file():
            paths.append(collect / r / "run.parquet")
        else:
            return None
    return [pq.read_table(f).to_pylist()[0] for f in paths]


def grids(p: Params, results: Path | None = None, collect: Path | None = None) -> dict[str, Grid]:
    """Every group that holds runs at more than one lr, with choose_lr's rows once all its grid runs have
    finished (a committed record, or a row in `collect`)."""
    by_group: dict[str, list[str]] = {}
    for name, spec in p.runs.items():
        by_group.setdefault(spec.group or name, []).append(name)
    done = set(done_runs(p, results))  # once: it reads and checks every committed RECORD.json
    out = {}
    for group, runs in sorted(by_group.items()):
        if len({p.runs[r].lr for r in runs}) < 2:
            continue
        grid_runs = tuple(sorted(r for r in runs if re.search(r"_lr[^_]+$", r))) or tuple(sorted(runs))
        rows: tuple[dict[str, Any], ...] = ()
        table = _run_rows(p, grid_runs, done, results, collect)  # the grid alone: runs at the chosen lr do not vote
        if table is not None:
            rows = tuple(choose_lr(table))
        out[group] = Grid(group, *_key(p, grid_runs[0]), runs=grid_runs, rows=rows)
    return out


def follows(p: Params, run: str, by: dict[str, Grid]) -> Grid | None:
    """The grid whose choice `run` takes (None: no grid of its kind and compute scale, or a grid run)."""
    group = p.runs[run].group or run
    if group in by:
        return None if run in by[group].runs or p.runs[run].lr is None else by[group]
    kind, scale, rate = _key(p, run)
    same = [g for g in by.values() if (g.kind, g.compute_scale) == (kind, scale)]
    return min(same, key=lambda g: (abs(g.activation_rate - rate), g.group)) if same else None


def assignments(p: Params, by: dict[str, Grid]) -> list[dict[str, Any]]:
    """One row per run that follows a grid: its grid, the chosen lr (None while the grid is incomplete)."""
    rows = []
    for run in sorted(p.runs):
        g = follows(p, run, by)
        if g is not None:
            rows.append({"run": run, "group": p.runs[run].group or run, "follows": g.group,
                         "activation_rate": _key(p, run)[2], "grid_rate": g.activation_rate,
                         "lr_now": p.runs[run].lr, "lr_chosen": g.best})
    return rows


_LR = re.compile(r"(?<![\w.])lr:\s*[-+0-9.eE]+")


def write_study(path: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Set `lr:` on each row's run line (a one-line flow mapping `  name: {..., lr: X}`); returns the runs
    changed. The file is re-read and checked; a run written over several lines is an error naming it."""
    lines = path.read_text().splitlines(keepends=True)
    changed = []
    for row in rows:
        pat = re.compile(rf"^\s+{re.escape(row['run'])}:\s*\{{.*\}}\s*(#.*)?$")
        hits = [i for i, line in enumerate(lines) if pat.match(line)]
        if len(hits) != 1 or len(_LR.findall(lines[hits[0]])) != 1:
            raise LrChoiceError(f"{path}: run {row['run']} is not one line `{row['run']}: {{..., lr: X}}` "
                                "with one lr: set its lr by hand")
        i = hits[0]
        new = _LR.sub(f"lr: {row['lr_chosen']:.1e}".replace("e-0", "e-").replace("e+0", "e+"), lines[i])
        if new != lines[i]:
            lines[i] = new
            changed.append(row["run"])
    with atomic_path(path) as tmp:  # checked before it replaces the file: a failed check leaves it as it was
        tmp.write_text("".join(lines))
        try:
            p = load_params(tmp)
        except ParamsError as err:
            raise LrChoiceError(f"{path}: the edited file does not validate ({err}); left unchanged") from None
        wrong = [r["run"] for r in rows if p.runs[r["run"]].lr != r["lr_chosen"]]
        if wrong:
            raise LrChoiceError(f"{path}: once edited, runs {wrong} would not have their chosen lr; left unchanged")
    return changed


def markdown(p: Params, by: dict[str, Grid], rows: list[dict[str, Any]], study: Path) -> str:
    out = [f"# Learning rates of study `{p.study}`", "",
           f"Chosen on the validation split from the grid runs' committed records (`python -m moe_study.remote "
           f"choose-lr --study {study} --write`; rule: the lowest mean validation loss, moe_study/report/"
           "aggregate.py `choose_lr`; the held-out split is not used). A run without a grid of its own follows the "
           "grid of the same kind and compute scale at the nearest activation rate.", "",
           "## Grids", "", "| group | r_a | lr | runs | validation loss | validation bpb | chosen |",
           "|---|---|---|---|---|---|---|"]
    for g in by.values():
        if not g.rows:
            out.append(f"| {g.group} | {g.activation_rate:.3f} | - | {len(g.runs)} | (incomplete) | | |")
        for r in g.rows:
            chosen = "**chosen**" if r["best"] else ""
            out.append(f"| {g.group} | {g.activation_rate:.3f} | {r['lr']:g} | {r['runs']} "
                       f"| {r['validation_loss']:.4f} | {r['validation_bpb']:.4f} | {chosen} |")
    edge = [g.group for g in by.values() if g.best is not None and g.best in (min(r["lr"] for r in g.rows),
                                                                              max(r["lr"] for r in g.rows))]
    if edge:
        out += ["", f"At the edge of its grid (the optimum may lie outside it): {', '.join(edge)}."]
    out += ["", "## Runs that take a chosen lr", "", "| run | group | follows | r_a (grid's) | lr |",
            "|---|---|---|---|---|"]
    for r in rows:
        lr = "(grid incomplete)" if r["lr_chosen"] is None else f"{r['lr_chosen']:g}"
        out.append(f"| {r['run']} | {r['group']} | {r['follows']} | {r['activation_rate']:.3f} ({r['grid_rate']:.3f}) "
                   f"| {lr} |")
    return "\n".join(out) + "\n"


def pending_runs(p: Params, results: Path | None = None, collect: Path | None = None) -> dict[str, str]:
    """Runs that must not train yet, with why: they follow a grid that lacks records of some of its runs,
    or their lr is not their grid's choice (a placeholder not yet replaced by `choose-lr --write`)."""
    out = {}
    for r in assignments(p, grids(p, results, collect)):
        if r["lr_chosen"] is None:
            out[r["run"]] = f"its lr follows grid {r['follows']}, which is not complete yet"
        elif r["lr_now"] != r["lr_chosen"]:
            out[r["run"]] = (f"lr {r['lr_now']:g} is not the {r['lr_chosen']:g} chosen on grid {r['follows']} "
                             "(`python -m moe_study.remote choose-lr --write`)")
    return out


def choose(study: Path, results: Path | None = None, write: bool = False, collect: Path | None = None) -> str:
    """The choice as Markdown; `write`: each run that follows a complete grid gets its chosen lr in the study
    file (runs of grids still incomplete keep theirs and stay pending), and lr_choice.md is written.
    `collect`: grid runs finished here but not yet recorded count too (the driver on a lent machine)."""
    p = load_params(study)
    by = grids(p, results, collect)
    if not by:
        raise LrChoiceError(f"{study}: no group has runs at more than one lr (no grid to choose from)")
    rows = assignments(p, by)
    text = markdown(p, by, rows, study)
    if write:
        changed = write_study(study, [r for r in rows if r["lr_chosen"] is not None])
        write_bytes((results or Path("results") / p.study) / "lr_choice.md", text.encode())
        waiting = sorted(r["run"] for r in rows if r["lr_chosen"] is None)
        text += (f"\nwrote the chosen lr of {len(changed)} runs into {study}: {', '.join(changed) or 'none changed'}"
                 f"\nstill waiting for their grid: {', '.join(waiting) or 'none'}\n")
    return text
