"""The runs of a study that a loan should train next.

Why a module of its own: "still to do" joins two facts kept apart, which runs have a current record
(moe_study.remote.records) and which runs must wait for an lr grid (moe_study.remote.lr_choice, which
reads records itself), so it sits above both.
"""

from __future__ import annotations

from pathlib import Path

from moe_study.config.schema import Params
from moe_study.remote.lr_choice import pending_runs
from moe_study.remote.records import done_runs


def todo_runs(p: Params, results: Path | None = None, collect: Path | None = None) -> list[str]:
    """The runs still to train: no current record, and not waiting for an lr grid (lr_choice.pending_runs;
    `collect`: grid runs finished on this machine but not recorded yet count as finished)."""
    done = set(done_runs(p, results))
    pending = pending_runs(p, results, collect)
    return [r for r in sorted(p.runs) if r not in done and r not in pending]
