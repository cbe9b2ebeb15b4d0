"""What every stage's command line shares: logging, progress with rate and ETA, one-line errors.

Bad input the user can fix ends as one `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("stages")


def setup_logging(stage: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO"),
        format=f"%(asctime)s {stage} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return logging.getLogger(f"stages.{stage}")


def n_workers(requested: int = 0) -> int:
    """0 means all cores this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


# -------------------------------------------------------------------------------------- progress
def progress(it: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """A tqdm bar on a terminal, periodic log lines with rate and ETA otherwise (DVC/Snakemake logs)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            it,
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=True,
            mininterval=0.5 if interactive else 10.0,
            disable=os.environ.get("NO_PROGRESS") == "1",
            file=sys.stderr,
            dynamic_ncols=interactive,
            ascii=not interactive,
        )
    )


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def fail(msg: str, code: int = 2) -> None:
    """Exit with one clear line (used for bad inputs the user can fix)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def per_run_main(
    stage: str,
    doc: str | None,
    body: Callable[[Any, str], Any],
    errors: tuple[type[BaseException], ...] = (),
    argv: list[str] | None = None,
) -> int:
    """The command line of a per-run stage (`python -m stages.<stage> --run NAME`).

    Validates params.yaml and the run name before any compute, then calls `body(params, run)`;
    an expected error (bad params, a missing input, the stage's own error types) becomes one clear
    line and exit code 2 instead of a traceback.
    """
    import argparse

    from moe_study.config.load import load_params
    from moe_study.config.schema import ParamsError

    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=(doc or "").splitlines()[0])
    ap.add_argument("--run", required=True, help="a run name from params.yaml runs")
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    setup_logging(stage)
    try:
        p = load_params(a.params)
        p.run(a.run)
        body(p, a.run)
    except (ParamsError, KeyError, FileNotFoundError, ValueError, *errors) as err:
        fail(str(err).strip("'\""))
    return 0
