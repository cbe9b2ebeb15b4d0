"""Train runs through the train stage's body with every speed choice at its default (moe_study/train/speed.py)
and print what train.json records: `speed_defaults`, the engine, compile, the graphs, the step rate.

    python bench/speed_defaults_smoke.py bench/speed_defaults_smoke.yaml dense r10

The data stages (corpus .. replay) must have run for the file. A GPU image without PyYAML, dvclive or
safetensors still runs it: the params may be given as JSON, and the missing writers (the dvclive curves,
the safetensors weights) are replaced by no-op / torch.save ones, named in the output (`stubbed`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_study.config.schema import parse_params  # noqa: E402
from moe_study.train import loop  # noqa: E402


def stub_missing() -> list[str]:
    stubbed = []
    if importlib.util.find_spec("dvclive") is None:
        loop.write_dvclive = lambda *a, **k: None
        stubbed.append("dvclive")
    if importlib.util.find_spec("safetensors") is None:
        loop.save_model = lambda model, d, config: torch.save(model.state_dict(), Path(d) / "model.pt")
        stubbed.append("safetensors")
    return stubbed


def main(argv: list[str]) -> int:
    path, runs = Path(argv[0]), argv[1:]
    if path.suffix == ".json":
        p = parse_params(json.loads(path.read_text()))
    else:
        from moe_study.config.load import load_params

        p = load_params(path)
    stubbed = stub_missing()
    for run in runs:
        r: dict[str, Any] = loop.run_train(p, run)
        keys = ("run", "device_name", "engine", "compile", "cuda_graph", "cuda_graph_fallback", "speed_defaults",
                "expert_backends", "steps", "wall_seconds", "tokens_per_second", "final_train_loss")
        print(json.dumps({k: r.get(k) for k in keys} | {"stubbed": stubbed,
                          "params_sha256": r["provenance"]["params_sha256"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
