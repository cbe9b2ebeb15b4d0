"""evaluate@run: held-out loss, bits per byte and zero-shot task accuracy of one trained run.

The scoring: moe_study.evaluation (heldout_loss, tasks).
"""

from __future__ import annotations

from moe_study.cli import per_run_main
from moe_study.data.heldout import HeldoutError
from moe_study.data.tasks import TaskError
from moe_study.evaluation.heldout_loss import EvalError, run_evaluate


def main(argv: list[str] | None = None) -> int:
    return per_run_main("evaluate", __doc__, run_evaluate, (EvalError, HeldoutError, TaskError), argv)


if __name__ == "__main__":
    raise SystemExit(main())
