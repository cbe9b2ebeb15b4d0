"""plan_table: the study's plan as one table (results/<study>/plan.parquet and plan.md).

From params.yaml alone, so a paper-scale study can be planned without building anything
(`python -m stages.plan_table studies/paper_2b.yaml`).
"""

from __future__ import annotations

import argparse

from moe_study.accounting import PlanError
from moe_study.cli import fail, setup_logging
from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError
from moe_study.report.plan_table import plans_from_params, write_table


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.plan_table [params.yaml]`."""
    ap = argparse.ArgumentParser(prog="python -m stages.plan_table", description=__doc__.splitlines()[0])
    ap.add_argument("params", nargs="?", default="params.yaml")
    a = ap.parse_args(argv)
    log = setup_logging("plan_table")
    try:
        p = load_params(a.params)
        plans = plans_from_params(p)
        pq_path, md_path = write_table(p, plans)
    except (ParamsError, PlanError) as err:
        fail(str(err).strip("'\""))
    log.info("wrote %s and %s (%d runs)", pq_path, md_path, len(plans))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
