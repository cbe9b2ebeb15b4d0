"""`python -m moe_study.remote`: run a study remotely, pack, import and rebuild its report from records.

    todo    --study FILE                      the runs whose committed records are missing or stale
    run     FILE --out DIR [--runs a,b] [--budget-s S] [--gpu-share S] [--choose-lr]   (on the GPU machine)
    pack    --study FILE --out DIR [--runs a,b]   the finished runs of work/ into DIR/records.tar.gz
    import  TARBALL --study FILE [--results DIR] [--replace | --keep] [--choose-lr]   into results/<study>/records/
    choose-lr --study FILE [--write]         the lr grids' choice into the runs that follow them
    rebuild --study FILE [--results DIR] [--partial]   metrics.duckdb, summary.md, plots from the records alone
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError
from moe_study.io import ClearError


def _runs(text: str | None) -> list[str] | None:
    return [r for r in text.split(",") if r] if text else None


def import_records(study: Path, tarball: Path, results: Path | None = None, replace: bool = False,
                   choose_lr: bool = False, keep: bool = False) -> list[str]:
    """`import`; with `choose_lr` (a loan that ran `run --choose-lr`): first the records that are runs of
    the study file as it is (the grids among them), then `choose-lr --write` from the records now there,
    then the rest, each checked against the study file as the choice left it (a follower whose lr is
    still not the chosen one is refused, naming the field)."""
    from moe_study.remote.bundle import bundle_records, import_bundle
    from moe_study.remote.records import RecordError, check_identity

    p = load_params(study)
    if not choose_lr:
        return import_bundle(p, tarball, results, replace, keep=keep)
    first, later = set(), set()
    for run, record in bundle_records(tarball).items():
        try:
            check_identity(p, run, record)
            first.add(run)
        except RecordError:
            later.add(run)
    wrote = import_bundle(p, tarball, results, replace, only=first, keep=keep)
    from moe_study.remote.lr_choice import choose

    print(choose(study, results, write=True).splitlines()[-2], file=sys.stderr)
    return wrote + import_bundle(load_params(study), tarball, results, replace, only=later, keep=keep)


def rebuild(study: Path, results: Path | None = None, partial: bool = False) -> str:
    """The aggregate stage with the committed records as its collect directory: the one CPU command.

    It leaves results/metrics.duckdb (the DAG's copy of params.yaml's current study) alone. `partial`: a
    study still running (e.g. after its lr-grid phase, to choose the learning rates) is reported from the
    runs that have a record, into results/<study>/partial/, its summary headed by what is missing; the
    complete report (no `partial`) refuses a missing run."""
    from moe_study.remote.records import done_runs, records_dir
    from moe_study.report.aggregate import aggregate

    p = load_params(study)
    results = results or Path("results") / p.study
    if not partial:
        return aggregate(p, collect_dir=records_dir(p, results), results=results, current_copy=None)
    done = sorted(done_runs(p, results))
    if not done:
        raise ValueError(f"no records of study {p.study} in {records_dir(p, results)}: nothing to report")
    missing = sorted(set(p.runs) - set(done))
    note = (f"**PARTIAL REPORT: {len(done)} of {len(p.runs)} runs have a record** (`python -m moe_study.remote "
            f"rebuild --partial`); not yet run: {', '.join(missing) or 'none'}. Comparisons below use only "
            "the runs present.")
    return aggregate(p, collect_dir=records_dir(p, results), results=results / "partial", current_copy=None,
                     runs=done, note=note)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_study.remote", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("todo")
    t.add_argument("--study", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("study", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--runs", help="comma-separated runs (default: those without a committed record)")
    r.add_argument("--budget-s", type=float, default=480, help="start no batch that would end after this")
    r.add_argument("--cores", type=int)
    r.add_argument("--gpu-share", type=int, help="passed as --config gpu_share=S --resources gpu_slots=S")
    r.add_argument("--batch", type=int, help="runs per snakemake call (default: the gpu share, else 1)")
    r.add_argument("--choose-lr", action="store_true",
                   help="before each batch, carry the finished lr grids' choice to the runs that follow them")
    r.add_argument("--fill", action="store_true",
                   help="start batches until the deadline (a warm machine resumes cut runs from checkpoints)")
    pk = sub.add_parser("pack")
    pk.add_argument("--study", type=Path, required=True)
    pk.add_argument("--out", type=Path, required=True)
    pk.add_argument("--runs")
    im = sub.add_parser("import")
    im.add_argument("tarball", type=Path)
    im.add_argument("--study", type=Path, required=True)
    im.add_argument("--results", type=Path, help="default results/<study>")
    conflict = im.add_mutually_exclusive_group()
    conflict.add_argument("--replace", action="store_true", help="overwrite a different record of the same run")
    conflict.add_argument("--keep", action="store_true",
                          help="keep the record already here where the tarball's differs (a run a later call re-ran)")
    im.add_argument("--choose-lr", action="store_true",
                    help="import the grids' records, carry their lr choice into the study file, then the rest")
    rb = sub.add_parser("rebuild")
    rb.add_argument("--study", type=Path, required=True)
    rb.add_argument("--results", type=Path, help="default results/<study>")
    rb.add_argument("--partial", action="store_true",
                    help="report the runs that have a record (into <results>/partial/), e.g. to choose lrs")
    ch = sub.add_parser("choose-lr", help="carry the lr grids' choice to the runs that follow them")
    ch.add_argument("--study", type=Path, required=True)
    ch.add_argument("--results", type=Path, help="default results/<study>")
    ch.add_argument("--write", action="store_true", help="edit the study file's lr: lines, write lr_choice.md")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s remote %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if a.cmd == "todo":
            from moe_study.remote.todo import todo_runs

            print(",".join(todo_runs(load_params(a.study))))
        elif a.cmd == "run":
            from moe_study.remote.drive import drive

            drive(a.study, a.out, _runs(a.runs), a.budget_s, a.cores, a.gpu_share, a.batch, choose_lr=a.choose_lr,
                  fill=a.fill)
        elif a.cmd == "pack":
            from moe_study.remote.bundle import pack

            p = load_params(a.study)
            index = pack(p, _runs(a.runs) or sorted(p.runs), a.out)
            print(f"packed {sorted(index['runs'])}; missing {[m['run'] for m in index['missing']]}")
        elif a.cmd == "import":
            wrote = import_records(a.study, a.tarball, a.results, a.replace, a.choose_lr, a.keep)
            p = load_params(a.study)
            print(f"imported {wrote or 'nothing new'} into {(a.results or Path('results') / p.study) / 'records'}")
        elif a.cmd == "choose-lr":
            from moe_study.remote.lr_choice import choose

            print(choose(a.study, a.results, a.write))
        elif a.cmd == "rebuild":
            print(rebuild(a.study, a.results, a.partial))
    except (ClearError, ParamsError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
