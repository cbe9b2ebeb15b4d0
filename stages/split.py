"""split: train / validation / held-out split by duplicate cluster, after dedupe (moe_study.data.split).
"""

from __future__ import annotations

import argparse

from moe_study.cli import fail
from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError
from moe_study.data.artefacts import ShardError
from moe_study.data.split import SplitError, run_split


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    try:
        run_split(load_params(a.params))
    except (SplitError, ParamsError, ShardError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
