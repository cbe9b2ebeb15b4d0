"""tasks: zero-shot tasks built from the held-out documents (moe_study.data.tasks).
"""

from __future__ import annotations

import argparse

from moe_study.cli import fail, setup_logging
from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError
from moe_study.data.heldout import HeldoutError
from moe_study.data.tasks import TaskError, build_tasks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    setup_logging("tasks")
    try:
        build_tasks(load_params(a.params))
    except (ParamsError, HeldoutError, TaskError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
