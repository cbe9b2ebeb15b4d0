"""Checkpoints, resume after kill -9, and the NaN / exploding-gradient stop, on the tiny CPU setup.

The killed run is a real process that SIGKILLs itself right after a training step (between two
checkpoints, so the steps since the last one are lost and must be re-trained). Re-running the
stage with the same inputs resumes from the last checkpoint and must give exactly the loss curve
and weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train_eval import PARAMS, make_work, step_curve

from moe_study.config.schema import parse_params
from moe_study.io import ROOT, read_json, write_json
from moe_study.train import checkpoint
from moe_study.train.loop import NonFiniteError, run_train

CKPT_EVERY = 4

# Train the dense run in `work`, and SIGKILL this process right after step KILL_AT (a test-only hook).
KILLED_TRAINER = """
import os, signal, sys
from pathlib import Path
import yaml
from moe_study.config.schema import parse_params
from moe_study.train import loop as T
work, kill_at = Path(sys.argv[1]), int(sys.argv[2])
p = parse_params(yaml.safe_load((work / "params.yaml").read_text()))
step = T.Trainer.train_step
def dying_step(self, batch):
    s = step(self, batch)
    if s.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return s
T.Trainer.train_step = dying_step
T.run_train(p, "dense", work=work)
"""


def raw_params() -> dict:
    raw = copy.deepcopy(PARAMS)
    raw["train"]["checkpoint_every"] = CKPT_EVERY
    return raw


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k != "TRAIN_FAULT"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def ckpt_step(work: Path, run: str) -> int | None:
    pointers = list((work / "ckpt" / run).glob(f"*/{checkpoint.LATEST}"))
    assert len(pointers) <= 1, pointers
    return read_json(pointers[0])["step"] if pointers else None


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    p = parse_params(raw_params())
    work = make_work(tmp_path_factory.mktemp("straight"), p, ["dense"])
    run_train(p, "dense", work=work)
    return work


def test_resume_after_kill_9_gives_the_uninterrupted_curve(straight: Path, tmp_path: Path) -> None:
    p = parse_params(raw_params())
    work = make_work(tmp_path, p, ["dense"])
    (work / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    kill_at = 2 * CKPT_EVERY + 2  # two steps after the second checkpoint
    r = subprocess.run([sys.executable, "-c", KILLED_TRAINER, str(work), str(kill_at)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (work / "runs/dense/train.json").exists()
    assert ckpt_step(work, "dense") == 2 * CKPT_EVERY

    res = run_train(p, "dense", work=work)  # the stage re-run: resumes
    assert res["resumed_from_step"] == 2 * CKPT_EVERY
    assert step_curve(work / "runs/dense") == step_curve(straight / "runs/dense")
    model = "runs/dense/model/model.safetensors"
    assert (work / model).read_bytes() == (straight / model).read_bytes()
    assert ckpt_step(work, "dense") == res["steps"]  # the final checkpoint


def test_changed_config_does_not_resume_a_stale_checkpoint(straight: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(straight, work)
    raw = raw_params()
    raw["train"]["lr"] = 5e-3
    assert ckpt_step(work, "dense") is not None
    old_keys = {d.name for d in (work / "ckpt" / "dense").iterdir()}
    res = run_train(parse_params(raw), "dense", work=work)
    assert res["resumed_from_step"] is None
    # its own key; the old config's checkpoints, which can never resume this run, were removed
    assert [d.name for d in (work / "ckpt" / "dense").iterdir()] == [Path(res["checkpoint_dir"]).name]
    assert Path(res["checkpoint_dir"]).name not in old_keys


def test_logging_settings_keep_the_checkpoint_key(straight: Path, tmp_path: Path) -> None:
    """log_every / checkpoint_every do not change what is trained: the same key, so a re-run resumes
    (here: from the final checkpoint) instead of pruning it and starting over."""
    work = tmp_path / "work"
    shutil.copytree(straight, work)
    raw = raw_params()
    raw["train"]["log_every"] = raw["train"].get("log_every", 10) + 1
    raw["train"]["checkpoint_every"] = CKPT_EVERY + 1
    key = {d.name for d in (work / "ckpt" / "dense").iterdir()}
    res = run_train(parse_params(raw), "dense", work=work)
    assert {Path(res["checkpoint_dir"]).name} == key
    assert res["resumed_from_step"] == ckpt_step(straight, "dense")


def test_a_checkpoint_of_another_engine_is_not_loaded(straight: Path, tmp_path: Path) -> None:
    """`engine: auto` trains with DeepSpeed on a GPU and torch on the CPU under one key: a work dir
    moved between them starts over instead of failing to load the other engine's files."""
    work = tmp_path / "work"
    shutil.copytree(straight, work)
    (pointer,) = (work / "ckpt" / "dense").glob(f"*/{checkpoint.LATEST}")
    write_json(pointer, read_json(pointer) | {"engine": "deepspeed"})
    res = run_train(parse_params(raw_params()), "dense", work=work)
    assert res["resumed_from_step"] is None
    assert step_curve(work / "runs/dense") == step_curve(straight / "runs/dense")
    model = "runs/dense/model/model.safetensors"
    assert (work / model).read_bytes() == (straight / model).read_bytes()


@pytest.mark.parametrize("fault, message", [("nan_loss@6", "step 6: non-finite loss"),
                                            ("grad_spike@7", "step 7: gradient norm")])
def test_blow_up_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, message: str) -> None:
    p = parse_params(raw_params())
    work = make_work(tmp_path, p, ["dense"])
    monkeypatch.setenv("TRAIN_FAULT", fault)
    with pytest.raises(NonFiniteError, match=message) as err:
        run_train(p, "dense", work=work)
    assert "last good checkpoint" in str(err.value)
    assert ckpt_step(work, "dense") == CKPT_EVERY
    assert not (work / "runs/dense/train.json").exists()
    monkeypatch.delenv("TRAIN_FAULT")
    res = run_train(p, "dense", work=work)  # fixed: the re-run continues from the good checkpoint
    assert res["resumed_from_step"] == CKPT_EVERY
    assert step_curve(work / "runs/dense") == step_curve(straight / "runs/dense")


def test_the_stage_command_exits_non_zero_on_nan(tmp_path: Path) -> None:
    p = parse_params(raw_params())
    work = make_work(tmp_path, p, ["dense"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    r = subprocess.run([sys.executable, "-m", "stages.train", "--run", "dense", "--params", "params.yaml"],
                       cwd=tmp_path, env=env() | {"TRAIN_FAULT": "nan_loss@3"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: step 3: non-finite loss" in r.stderr and "no checkpoint was written yet" in r.stderr
    assert work.name == "work" and not (work / "runs/dense/train.json").exists()
