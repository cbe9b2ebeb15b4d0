"""The "auto" speed choices (moe_study/train/speed.py): the measured defaults on one GPU, explicit values
win, every other case (CPU above all) keeps what it ran before, and train.json records the choice."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moe_study.config.schema import TrainConfig
from moe_study.train import loop as T
from moe_study.train import speed
from moe_study.train.engine import make_engine, speed_config

FIELDS = ("engine", "expert_backend", "compile", "compile_mode", "cuda_graph")


def picked(cfg: TrainConfig) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in FIELDS}


def test_one_gpu_gets_the_fastest_measured_configuration() -> None:
    cfg, record = speed.resolve(TrainConfig(), "cuda", 1, 1)
    assert picked(cfg) == {"engine": "torch", "expert_backend": "torch_grouped", "compile": True,
                           "compile_mode": None, "cuda_graph": True}
    assert record == {"engine": "torch", "expert_backend": "torch_grouped", "compile": "default", "cuda_graph": True,
                      "source": "results/perf/study_step_h200.md", "auto_off": {},
                      "requested": {"engine": "auto", "expert_backend": "auto", "compile": "auto",
                                    "cuda_graph": "auto"}}
    assert speed.resolve(cfg, "cuda", 1, 1)[0] == cfg  # idempotent: make_engine may resolve a resolved cfg


def test_cpu_keeps_todays_choices_and_hashes() -> None:
    """CPU: compile and graphs off, engine and experts left to their own auto (torch, reference), no record;
    the dump (provenance, checkpoint key) is the one of the explicit pre-table defaults."""
    cfg, record = speed.resolve(TrainConfig(), "cpu", 1, 1)
    assert record is None
    assert cfg.model_dump() == TrainConfig(compile=False, cuda_graph=False).model_dump()
    assert picked(cfg) == {"engine": "auto", "expert_backend": "auto", "compile": False, "compile_mode": None,
                           "cuda_graph": False}
    assert speed.resolve(TrainConfig(compile="auto", compile_mode="max-autotune"), "cpu", 2, 1)[0].compile_mode is None
    # an "auto" that resolves differently on a GPU is another checkpoint key and params hash
    assert speed.resolve(TrainConfig(), "cuda", 1, 1)[0].model_dump() != cfg.model_dump()


def test_several_gpus_keep_deepspeed_and_say_why() -> None:
    cfg, record = speed.resolve(TrainConfig(gpus=2), "cuda", 2, 1)
    assert picked(cfg) == {"engine": "auto", "expert_backend": "auto", "compile": False, "compile_mode": None,
                           "cuda_graph": False}
    assert record is not None and record["source"] is None
    assert set(record["auto_off"]) == {"compile", "cuda_graph"} and "2 processes" in record["auto_off"]["compile"]


@pytest.mark.parametrize("explicit, want, off", [
    ({"engine": "deepspeed"}, {"engine": "deepspeed", "compile": False, "cuda_graph": False},
     {"compile": "torch engine only", "cuda_graph": "need the torch engine"}),
    ({"compile": False}, {"engine": "torch", "compile": False, "cuda_graph": True}, {}),
    ({"cuda_graph": False}, {"compile": True, "cuda_graph": False}, {}),
    ({"expert_backend": "reference"}, {"expert_backend": "reference", "compile": True, "cuda_graph": False},
     {"cuda_graph": "host"}),
    ({"expert_backend": "fused"}, {"expert_backend": "fused", "cuda_graph": True}, {}),
    ({"compile_mode": "reduce-overhead"}, {"compile": True, "compile_mode": "reduce-overhead", "cuda_graph": False},
     {"cuda_graph": "already captures"}),
    ({"compile": True, "cuda_graph": True, "engine": "deepspeed"}, {"compile": True, "cuda_graph": True}, {}),
])
def test_explicit_values_win_and_an_auto_that_cannot_apply_says_why(
        explicit: dict[str, object], want: dict[str, object], off: dict[str, str]) -> None:
    cfg, record = speed.resolve(TrainConfig(**explicit), "cuda", 1, 1)
    assert {f: getattr(cfg, f) for f in want} == want
    assert record is not None and set(record["auto_off"]) == set(off)
    for field, words in off.items():
        assert words in record["auto_off"][field]
    assert all(record["requested"][f] == v for f, v in explicit.items() if f in record["requested"])


def test_gradient_accumulation_keeps_the_step_eager() -> None:
    cfg, record = speed.resolve(TrainConfig(batch_size=16, micro_batch_size=4), "cuda", 1, 4)
    assert cfg.compile is True and cfg.cuda_graph is False
    assert record is not None and "accumulation 4" in record["auto_off"]["cuda_graph"]
    # speed_config derives the accumulation from the batch split itself
    assert speed_config(TrainConfig(batch_size=16, micro_batch_size=4), torch.device("cuda"))[0].cuda_graph is False


def test_schema_auto_values() -> None:
    assert (TrainConfig().compile, TrainConfig().cuda_graph) == ("auto", "auto")
    assert TrainConfig(compile_mode="max-autotune").compile == "auto"  # a mode for when auto compiles
    with pytest.raises(ValidationError, match="needs compile: true"):
        TrainConfig(compile=False, compile_mode="max-autotune")
    with pytest.raises(ValidationError):
        TrainConfig(compile="yes")
    with pytest.raises(ValidationError):
        TrainConfig(cuda_graph=1)


def test_cpu_engine_is_not_compiled_by_auto() -> None:
    """make_engine resolves before it compiles: a truthy "auto" must never compile a CPU model."""
    from test_train_eval import PARAMS, VOCAB

    from moe_study.accounting import plan_run
    from moe_study.config.schema import parse_params
    from moe_study.model.lm import build_model

    p = parse_params(PARAMS)
    model = build_model(plan_run(p, "dense").arch.to_dict(), VOCAB)
    eng = make_engine(model, p.train.model_copy(update={"device": "cpu"}), 1e-2, torch.device("cpu"))
    assert eng.name == "torch" and eng.cfg.compile is False and eng.cfg.cuda_graph is False
    assert model._compiled_head_loss is None


def test_train_json_records_the_speed_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the loop records: the resolution's record (GPU runs), nothing on CPU. The GPU side is simulated:
    the loop's resolution answers as on one GPU, with compile and graphs left off so a CPU can run it."""
    from test_train_eval import PARAMS, VOCAB, ListLoader, counting_batches

    from moe_study.accounting import plan_run
    from moe_study.config.schema import parse_params
    from moe_study.model.lm import build_model

    p = parse_params(PARAMS)
    cfg = p.train.model_copy(update={"device": "cpu", "compile": False, "cuda_graph": False})

    def run() -> dict[str, object]:
        torch.manual_seed(0)
        model = build_model(plan_run(p, "dense").arch.to_dict(), VOCAB)
        return T.train(model, ListLoader(counting_batches(2), 16), cfg, steps=2, batch_size=4, lr=1e-2, seed=0)[1]

    assert "speed_defaults" not in run()
    real = T.speed_config
    monkeypatch.setattr(T, "speed_config", lambda c, d, b=None: (real(c, d, b)[0], speed.resolve(c, "cuda", 1, 1)[1]))
    rec = run()["speed_defaults"]
    assert rec["source"] == speed.SOURCE and rec["engine"] == "torch" and rec["requested"]["compile"] is False
