"""replay@run: the epoch-replay data plan of one run, as a manifest (moe_study.data.replay).
"""

from __future__ import annotations

from moe_study.cli import per_run_main
from moe_study.data.replay import write_replay
from moe_study.data.shards import (
    ReplayError,
)


def main(argv: list[str] | None = None) -> int:
    return per_run_main("replay", __doc__, write_replay, (ReplayError,), argv)


if __name__ == "__main__":
    raise SystemExit(main())
