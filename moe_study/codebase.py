"""The code identity of a stage: which source files can change its outputs, and their hash.

Why computed, not listed: a hand-kept list of "the modules a stage uses" drifts (a stage that
starts importing a helper keeps the old list, so its outputs stop changing with that helper's
code). Here the list is the static import closure of the stage's entry point, `stages/<name>.py`,
over the project's own packages (`stages`, `moe_study`, `kernels`), counting imports anywhere in a
file (lazy imports inside functions too) and the `__init__.py` of every package on the way. The
`kernels` package counts as one unit: a stage that reaches any kernel depends on all of `kernels/`
(its Python, its CUDA sources, the Triton and CUTLASS fallbacks chosen at run time).

The same list is the stage's DVC/Snakemake code dependencies (`moe_study.registry`), the
`code_sha256` of its provenance, and (for train) part of the checkpoint key, so one edit re-runs
the stage under both engines and never resumes a checkpoint written by other code.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

from moe_study.io import ROOT

PACKAGES = ("stages", "moe_study", "kernels")
KERNELS = "kernels"
# Imports that cannot change an output, so they do not make code identity: loading params.yaml
# checks that every run can be planned (the planner, moe_study.accounting) and can only refuse a
# file, never change what a stage writes. Without this, an edit of the FLOP formulas would re-run
# corpus, tokenize and dedupe (hours at scale). Stages that plan (plan, train, ...) import the
# planner themselves and keep it in their identity.
VALIDATION_ONLY = {("moe_study.config.load", "moe_study.accounting")}


def stage_module(stage: str) -> str:
    """The entry point of a stage: `python -m stages.<name>`."""
    return f"stages.{stage}"


def module_path(module: str, root: Path = ROOT) -> Path | None:
    """The source file of a project module (`a.b` -> a/b.py or a/b/__init__.py), None if there is none."""
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def direct_imports(module: str, root: Path = ROOT) -> set[str]:
    """The project modules `module`'s file imports, anywhere in it (lazy imports in functions too).

    `from pkg import name` counts `pkg.name` when that is a module, else `pkg`; the packages above
    an imported module are not listed here (import_closure adds them: importing runs them)."""
    path = module_path(module, root)
    if path is None:
        return set()
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if module_path(sub, root) is not None else base)
    return {m for m in found if m.split(".")[0] in PACKAGES and module_path(m, root) is not None}


def _validation_only(importer: str, imported: str) -> bool:
    return any(importer == a and (imported == b or imported.startswith(b + ".")) for a, b in VALIDATION_ONLY)


@cache
def import_closure(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """Every project module that importing `module` can load, `module` and the packages above each included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            name = ".".join(parts[:i])
            if name in seen:
                continue
            if module_path(name, root) is None:
                continue
            seen.add(name)
            todo.extend(m for m in direct_imports(name, root) if not _validation_only(name, m))
    return tuple(sorted(seen))


@cache
def code_files(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """Repo-relative source files of `module`'s closure, `kernels` as one directory (see the module doc)."""
    files: set[str] = set()
    for m in import_closure(module, root):
        if m.split(".")[0] == KERNELS:
            files.add(KERNELS)
        else:
            files.add(module_path(m, root).relative_to(root).as_posix())
    return tuple(sorted(files))


def _expand(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def stage_code_sha256(stage: str) -> str:
    """A stage's code identity (its provenance `code_sha256`; part of train's checkpoint key)."""
    return files_hash(code_files(stage_module(stage)))


def files_hash(paths: tuple[str, ...], root: Path = ROOT) -> str:
    """SHA-256 over (relative path, bytes) of the files, directories expanded, in a fixed order."""
    h = hashlib.sha256()
    for rel in paths:
        for p in _expand(root / rel):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
