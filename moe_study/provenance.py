"""What made an output: input hashes, the params it read and the stage's code identity."""

from __future__ import annotations

from typing import Any

from moe_study.codebase import stage_code_sha256
from moe_study.hashing import sha256_json


def provenance(stage: str, inputs: dict[str, str], params: Any) -> dict:
    """What made an output of `stage`: input hashes, the params it read and the code that ran.

    `inputs` maps a name to an already-known hash (e.g. a manifest's own hash), so large inputs
    are never re-hashed byte by byte downstream. The code hash is the registry's code identity of
    the stage (moe_study.codebase): every source file its entry point can import, kernels/ whole.
    """
    return {
        "stage": stage,
        "inputs": dict(sorted(inputs.items())),
        "params": params,
        "params_sha256": sha256_json(params),
        "code_sha256": stage_code_sha256(stage),
    }
