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


def project_imports(module_file: Path, seen: set[Path] | None = None) -> set[Path]:
    """Project source files a module imports, transitively (stages.*, kernels.*, data.*)."""
    import ast

    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(module_file.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] not in {"stages", "kernels", "data"}:
                continue
            for cand in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
                if cand.exists() and cand not in seen:
                    seen.add(cand)
                    # schema imports accounting only to check feasibility before compute: no output
                    # depends on it through schema, so a formula edit must not re-run the data stages
                    if cand.name != "schema.py":
                        project_imports(cand, seen)
    return seen


def test_code_dependencies_cover_every_imported_project_module() -> None:
    """Editing any code a stage runs must re-run it in both engines: the registry lists it all."""
    problems = {}
    for s in STAGES:
        declared = {ROOT / c for c in s.code_files}
        declared_dirs = [ROOT / d.rstrip("/") for d in s.deps if isinstance(d, str) and not d.startswith("work/")]
        used = project_imports(ROOT / "stages" / f"{s.name}.py")
        empty_packages = {ROOT / "stages/__init__.py", ROOT / "data/__init__.py"}  # no code of their own
        missing = sorted(
            str(f.relative_to(ROOT)) for f in used - empty_packages
            if f not in declared and not any(f.is_relative_to(d) for d in declared_dirs)
        )
        if missing:
            problems[s.name] = missing
    assert not problems, f"stages import project code the registry does not list: {problems}"
