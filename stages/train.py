"""train@run: train one dense or MoE LM on its replayed token stream, exactly plan["steps"] steps.

`train.gpus: N > 1` outside a launcher re-runs this command under torchrun, one process per GPU;
a one-GPU run first claims a GPU slot (moe_study.train.gpu_slots: several runs may share a GPU).
The loop, engines, checkpoints and the training log live in moe_study.train.
"""

from __future__ import annotations

import sys

from moe_study.cli import fail, per_run_main
from moe_study.train.gpu_slots import claiming
from moe_study.train.launch import LaunchError, relaunch_under_torchrun
from moe_study.train.loop import TrainError, run_train


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        code = relaunch_under_torchrun(args)
    except LaunchError as err:
        fail(str(err))
    if code is not None:
        return code
    # a one-GPU run takes its GPU slot first (several runs may share a GPU: moe_study/train/gpu_slots.py)
    return per_run_main("train", __doc__, claiming("train", run_train), (TrainError,), args)


if __name__ == "__main__":
    raise SystemExit(main())
