"""collect@run: one run's plan, training record and evaluation as Parquet rows (moe_study.report.collect).
"""

from __future__ import annotations

from moe_study.cli import per_run_main
from moe_study.report.collect import CollectError, run_collect


def main(argv: list[str] | None = None) -> int:
    return per_run_main("collect", __doc__, run_collect, (CollectError,), argv)


if __name__ == "__main__":
    raise SystemExit(main())
