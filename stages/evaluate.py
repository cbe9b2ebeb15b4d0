"""evaluate@run: held-out loss, bits per byte and zero-shot task accuracy of one trained run.

The scoring: moe_study.evaluation (heldout_loss, tasks). It first claims a GPU slot
(moe_study.train.gpu_slots: several runs may share a GPU).
"""

from __future__ import annotations

from moe_study.cli import per_run_main
from moe_study.data.heldout import HeldoutError
from moe_study.data.tasks import TaskError
from moe_study.evaluation.heldout_loss import EvalError, run_evaluate
from moe_study.train.gpu_slots import claiming


def main(argv: list[str] | None = None) -> int:
    errors = (EvalError, HeldoutError, TaskError)
    return per_run_main("evaluate", __doc__, claiming("evaluate", run_evaluate), errors, argv)


if __name__ == "__main__":
    raise SystemExit(main())
