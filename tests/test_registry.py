"""The stage registry is the one description of the DAG: dvc.yaml must be generated from it."""

from __future__ import annotations

from pathlib import Path

import yaml

from moe_study.registry import STAGES, dvc_yaml_text, readme_text

ROOT = Path(__file__).resolve().parent.parent


def test_dvc_yaml_is_generated_from_the_registry() -> None:
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml_text(), "run `python -m moe_study.registry --write`"


def test_readme_stage_table_is_generated_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme == readme_text(readme), "run `python -m moe_study.registry --write`"
    for s in STAGES:
        assert f"`stages/{s.name}.py`" in readme


def test_every_stage_is_a_module_with_a_main() -> None:
    for s in STAGES:
        src = ROOT / "stages" / f"{s.name}.py"
        assert src.exists(), src
        assert "def main(" in src.read_text(), src


def test_per_run_stages_fan_out_over_runs() -> None:
    doc = yaml.safe_load(dvc_yaml_text())["stages"]
    for s in STAGES:
        assert ("foreach" in doc[s.name]) == s.per_run
        if s.per_run:
            assert doc[s.name]["foreach"] == "${runs}"


def test_every_dependency_is_produced_upstream_or_is_source() -> None:
    produced: set[str] = set()
    for s in STAGES:
        for d in s.deps:
            path = getattr(d, "pattern", d)
            if path.startswith("work/"):
                assert path in produced, f"{s.name} depends on {path} before any stage makes it"
        for c in s.code_files:
            assert (ROOT / c).exists() or c.startswith("kernels"), c
        produced.update(s.all_outs)


def test_gpu_slots_let_small_train_jobs_share_a_gpu() -> None:
    """train and evaluate take one of a GPU's gpu_share slots; several GPUs or no GPU are whole / nothing."""
    from moe_study.registry import STAGES, Resources, gpu_slots

    by = {s.name: s.resources for s in STAGES}
    assert by["train"].gpu_shareable and by["evaluate"].gpu_shareable
    assert gpu_slots(by["train"], 1, 4) == 1  # four runs at once on one GPU with --resources gpu_slots=4
    assert gpu_slots(by["train"], 2, 4) == 8  # a two-GPU run takes both GPUs whole
    assert gpu_slots(by["train"], 0, 4) == 0
    assert gpu_slots(Resources(gpus=1), 1, 4) == 4  # not shareable: the whole GPU
    assert gpu_slots(by["train"], 1, 1) == 1  # share 1 (the default): one job per GPU, as before
    snakefile = (Path(__file__).resolve().parent.parent / "Snakefile").read_text()
    assert "gpu_slots=gpu_slots(" in snakefile


def test_every_per_run_stage_takes_its_run_from_dvc(tmp_path: Path, monkeypatch, capsys) -> None:
    """dvc.yaml puts no run name on a command line: under DVC each per-run stage reads it from DVC_STAGE.
    A stage that still required --run would fail every `dvc repro` (as export@run once did)."""
    import importlib
    import shutil

    import pytest

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for s in STAGES:
        if not s.per_run:
            continue
        monkeypatch.setenv("DVC_STAGE", f"dvc.yaml:{s.name}@no_such_run")
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(s.module).main([])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (s.name, err)
        assert "no_such_run" in err and "required" not in err, (s.name, err)
