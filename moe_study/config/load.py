"""Read and validate a study's params.yaml: the schema first, then that every run can be planned.

`python -m moe_study.config.load [params.yaml]` validates a file and exits non-zero with the reason.
Kept apart from the schema so the schema never imports the planner (accounting imports the schema).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from moe_study.config.schema import Params, ParamsError, parse_params


class StrictYAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus what makes a params file ambiguous or expensive.

    Why: with the stock loader a duplicated key silently takes the last value (one of two edits is
    lost), and anchors/aliases let a few hundred bytes expand to gigabytes (an "alias bomb") before
    any validation. A params file needs neither, so both are errors naming the line. Floats follow
    YAML 1.2 (`1e-3` is a number, as DVC's `-S lr=1e-3` writes it), not YAML 1.1 (a string).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed in a params file", event.start_mark)
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "anchors (&name) are not allowed in a params file", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the last would silently win)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"\A[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+\Z"),
    list("-+0123456789"),
)


def read_yaml(path: Path) -> Any:
    """Parse a params file with StrictYAMLLoader; a bad file is a ParamsError naming it and the line."""
    try:
        return yaml.load(path.read_text(), Loader=StrictYAMLLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise ParamsError(f"{path}: not a readable text file ({err})") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Validate the file: schema first, then that every run can be planned within the budget."""
    from moe_study.accounting import PlanError, check_feasible  # accounting imports this module

    path = Path(path)
    params = parse_params(read_yaml(path), path)
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
