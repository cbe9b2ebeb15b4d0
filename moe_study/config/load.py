"""Read and validate a study's params.yaml: the schema first, then that every run can be planned.

`python -m moe_study.config.load [params.yaml]` validates a file and exits non-zero with the reason.
Kept apart from the schema so the schema never imports the planner (accounting imports the schema).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from moe_study.config.schema import Params, ParamsError, parse_params


def load_params(path: Path | str = "params.yaml") -> Params:
    """Validate the file: schema first, then that every run can be planned within the budget."""
    from moe_study.accounting import PlanError, check_feasible  # accounting imports this module

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    params = parse_params(data, path)
    try:
        check_feasible(params)
    except PlanError as err:
        raise ParamsError(f"{path}: {err}") from None
    return params


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_study.config.load [params.yaml]`: validate and exit non-zero with the reason."""
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "params.yaml"
    try:
        p = load_params(path)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: valid (study {p.study!r}, {len(p.runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
