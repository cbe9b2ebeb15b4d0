"""params.yaml validation: one clear error naming the field, exit non-zero, nothing written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import TINY, make_project, run

from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError, parse_params

ROOT = Path(__file__).resolve().parent.parent


def test_default_params_are_valid() -> None:
    p = load_params(ROOT / "params.yaml")
    assert p.runs and p.budget.params > 0


def bad(mutate) -> dict:
    p = copy.deepcopy(TINY)
    mutate(p)
    return p


CASES = {
    "negative budget": (lambda p: p["budget"].__setitem__("compute", -1.0), "budget.compute",
                        "greater than 0"),
    "activation rate 1.5": (lambda p: p["runs"]["moe_r50"].__setitem__("activation_rate", 1.5),
                            "runs.moe_r50.activation_rate", "less than or equal to 1"),
    "unknown key": (lambda p: p["train"].__setitem__("learning_rate", 0.1), "train.learning_rate", "unknown key"),
    "unknown top-level key": (lambda p: p.__setitem__("epochs", 3), "epochs", "unknown key"),
    "bad run name": (lambda p: p["runs"].__setitem__("a/b", {"kind": "dense"}), "runs", "becomes a path"),
    "moe without rate": (lambda p: p["runs"]["moe_r50"].pop("activation_rate"), "runs.moe_r50", "activation_rate"),
    "bands exceed perms": (lambda p: p["dedupe"].__setitem__("bands", 64), "dedupe", "exceeds num_perm"),
    "lr and lr_grid": (lambda p: p["runs"]["moe_r50"].update(lr=1e-3, lr_grid=[1e-3, 3e-3]), "runs.moe_r50",
                       "give lr or lr_grid, not both"),
    "negative lr in grid": (lambda p: p["runs"]["moe_r50"].__setitem__("lr_grid", [1e-3, -1]),
                            "runs.moe_r50.lr_grid.1", "greater than 0"),
    "repeated lr in grid": (lambda p: p["runs"]["moe_r50"].__setitem__("lr_grid", [1e-3, 0.001]),
                            "runs.moe_r50", "repeats a value"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_names_the_field(case: str) -> None:
    mutate, field, reason = CASES[case]
    with pytest.raises(ParamsError) as err:
        parse_params(bad(mutate))
    msg = str(err.value)
    assert f"  {field}:" in msg and reason in msg, msg


def test_infeasible_activation_rate_is_caught_before_compute(tmp_path: Path) -> None:
    # attention + norms of d=32, L=1 are ~4.2k of 30k params: a 10% rate cannot be met
    p = bad(lambda p: p["runs"]["moe_r50"].__setitem__("activation_rate", 0.1))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ParamsError, match=r"runs\.moe_r50\.activation_rate=0\.1"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("case", ["negative budget", "activation rate 1.5", "unknown key"])
@pytest.mark.parametrize("engine", ["python", "dvc", "snakemake"])
def test_engines_refuse_bad_params_and_write_nothing(tmp_path: Path, case: str, engine: str) -> None:
    mutate, field, _ = CASES[case]
    d = make_project(tmp_path, bad(mutate))
    cmd = {"python": ["python", "-m", "stages.corpus"], "dvc": ["dvc", "repro"], "snakemake": ["snakemake", "-c1"]}
    r = run(cmd[engine], d, check=False)
    assert r.returncode != 0
    assert field in r.stdout + r.stderr
    assert not (d / "work").exists() and not (d / "results").exists() and not (d / "dvc.lock").exists()


def test_lr_grid_expands_into_named_runs_of_one_group(tmp_path: Path) -> None:
    """Issue 14: runs.<name>.lr_grid (or train.lr_grid) becomes one run per lr, names derived, one group."""
    raw = copy.deepcopy(TINY)
    raw["runs"]["moe_r50"]["lr_grid"] = [1e-3, 3e-3, 1.5e-2]
    p = parse_params(raw)
    grid = {n: r for n, r in p.runs.items() if n.startswith("moe_r50_")}
    assert sorted(grid) == ["moe_r50_lr1e-3", "moe_r50_lr1p5e-2", "moe_r50_lr3e-3"] and "moe_r50" not in p.runs
    assert {r.lr for r in grid.values()} == {1e-3, 3e-3, 1.5e-2} and {r.group for r in grid.values()} == {"moe_r50"}
    assert all(r.lr_grid is None and r.activation_rate == raw["runs"]["moe_r50"]["activation_rate"]
               for r in grid.values())
    raw = copy.deepcopy(TINY)
    raw["train"]["lr_grid"] = [1e-3, 2e-3]
    raw["runs"]["dense"]["lr"] = 5e-3  # a run with its own lr stays one run
    p = parse_params(raw)
    assert "dense" in p.runs and {n for n in p.runs if n.startswith("moe_r50")} == {"moe_r50_lr1e-3", "moe_r50_lr2e-3"}
    raw["runs"]["moe_r50_lr1e-3"] = {"kind": "dense"}
    with pytest.raises(ParamsError, match="derived run name 'moe_r50_lr1e-3' is taken"):
        parse_params(raw)
    raw.pop("runs")["moe_r50_lr1e-3"]
    path = tmp_path / "grid.yaml"
    raw["runs"] = copy.deepcopy(TINY)["runs"]
    path.write_text(yaml.safe_dump(raw))
    from moe_study.config.load import expanded_text

    flat = yaml.safe_load(expanded_text(path))
    assert "lr_grid" not in flat["train"] and sorted(flat["runs"]) == sorted(load_params(path).runs)
    assert parse_params(flat).runs == load_params(path).runs  # DVC's foreach sees the same runs
