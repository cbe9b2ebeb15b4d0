"""The layout's promises: imports point one way (stages -> moe_study -> kernels) without cycles, and
every stage's code identity covers the code it runs, so an edit never resumes a stale checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_resume import ckpt_step, raw_params, straight  # noqa: F401  (straight: a fixture)

from moe_study import codebase
from moe_study.io import ROOT
from moe_study.registry import STAGES

LAYERS = ("stages", "moe_study", "kernels")  # each may import only the layers after it


def project_modules(root: Path = ROOT) -> list[str]:
    mods = []
    for pkg in codebase.PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def test_imports_point_one_way() -> None:
    wrong = []
    for m in project_modules():
        layer = LAYERS.index(m.split(".")[0])
        for dep in codebase.direct_imports(m):
            if LAYERS.index(dep.split(".")[0]) < layer:
                wrong.append(f"{m} imports {dep}")
    assert not wrong, "kernels must not import moe_study or stages, nor moe_study a stage:\n" + "\n".join(wrong)


def test_the_direction_check_catches_a_bad_import(tmp_path: Path) -> None:
    """The check above is not vacuous: a kernel importing the library is seen."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "moe_study").mkdir()
    (tmp_path / "moe_study" / "__init__.py").write_text("")
    (tmp_path / "moe_study" / "io.py").write_text("")
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "bad.py").write_text("def f():\n    from moe_study.io import ROOT\n")
    assert codebase.direct_imports("kernels.bad", tmp_path) == {"moe_study.io"}


def test_no_import_cycles() -> None:
    graph = {m: codebase.direct_imports(m) - {m} for m in project_modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_stages_folder_holds_only_stage_entry_points() -> None:
    names = {s.name for s in STAGES}
    files = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert files == names, f"not a stage: {sorted(files - names)}; missing: {sorted(names - files)}"


def test_code_identity_is_the_import_closure() -> None:
    train = STAGES[[s.name for s in STAGES].index("train")]
    assert "kernels" in train.code_files and "moe_study/model/lm.py" in train.code_files
    assert "stages/train.py" in train.code_files and "moe_study/train/loop.py" in train.code_files
    corpus = STAGES[0]
    assert "kernels" not in corpus.code_files and "moe_study/data/corpus.py" in corpus.code_files
    # validating params plans every run, but no data stage output depends on the planner's formulas
    assert "moe_study/accounting.py" not in corpus.code_files


def _copy_code(dest: Path) -> Path:
    for pkg in codebase.PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_every_kernels_file_is_part_of_the_train_code_identity(tmp_path: Path) -> None:
    root = _copy_code(tmp_path / "src")
    base = codebase.files_hash(codebase.code_files("stages.train", root), root)
    kernel_files = [p for p in (root / "kernels").rglob("*") if p.is_file()]
    assert len(kernel_files) > 5
    for p in kernel_files:
        before = p.read_bytes()
        p.write_bytes(before + b"\n")
        assert codebase.files_hash(codebase.code_files("stages.train", root), root) != base, p
        p.write_bytes(before)


def _train_stage(src: Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRAIN_FAULT"}
    env |= {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "stages.train", "--run", "dense", "--params", "params.yaml"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((cwd / "work/runs/dense/train.json").read_text())


def test_a_kernels_edit_never_resumes_a_checkpoint_of_the_old_code(straight: Path, tmp_path: Path) -> None:  # noqa: F811
    """The train stage run from a copy of the code: unchanged, it resumes at the final checkpoint;
    after one edit in kernels/ (a file no model module names), it trains from scratch."""
    src = _copy_code(tmp_path / "src")
    run = tmp_path / "run"
    shutil.copytree(straight, run / "work")
    (run / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    final = ckpt_step(straight, "dense")
    assert final is not None  # the final checkpoint of the uninterrupted run

    same = _train_stage(src, run)
    assert same["resumed_from_step"] == final  # control: the copied code has the same identity

    swiglu = src / "kernels" / "swiglu.py"
    swiglu.write_text(swiglu.read_text() + "\n# an edit\n")
    edited = _train_stage(src, run)
    assert edited["resumed_from_step"] is None
    assert edited["provenance"]["code_sha256"] != same["provenance"]["code_sha256"]
    assert ckpt_step(run / "work", "dense") == final  # trained again to the end, under its own key
