"""aggregate: the study database (DuckDB) from the per-run collect outputs, and the study report.

The database and the report: moe_study.report (aggregate, summary). `--collect-dir` reads the per-run rows
from elsewhere than work/collect: `--collect-dir results/<study>/records` rebuilds the report from the
committed records of a study run on another machine (moe_study/remote, `python -m moe_study.remote rebuild`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_study.cli import fail, setup_logging
from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError
from moe_study.report.aggregate import COLLECT_DIR, AggregateError, aggregate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--collect-dir", type=Path, default=COLLECT_DIR,
                    help="the per-run collect outputs (<dir>/<run>/run.parquet ...); default work/collect")
    a = ap.parse_args(argv)
    setup_logging("aggregate")
    try:
        p = load_params(a.params)
        table = aggregate(p, collect_dir=a.collect_dir)
    except (ParamsError, AggregateError, FileNotFoundError, KeyError, ValueError) as err:
        fail(str(err))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
