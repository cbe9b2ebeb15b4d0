"""Several model sizes in one study (budget.sizes, runs.<name>.size) and runs at a multiple of C
(runs.<name>.compute_scale): planning, validation and the plan table."""

from __future__ import annotations

import pytest

from moe_study.accounting import plan_run
from moe_study.config.schema import ParamsError, parse_params
from moe_study.report.plan_table import COLUMNS, columns_for, markdown, plans_from_params, rows

BASE = {
    "study": "sz",
    "corpus": {"sources": [{"kind": "synthetic"}]},
    "tokenizer": {"vocab_size": 512},
    "budget": {"params": 2.0e5, "compute": 3.0e12, "unique_tokens": 1_000_000, "compute_convention": "exact",
               "sizes": {"s": {"params": 2.0e5, "compute": 3.0e12},
                         "l": {"params": 8.0e5, "compute": 1.2e13, "model": {"d_model": 96, "n_layers": 3}}}},
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 128, "multiple_of": 1},
    "runs": {"s_dense": {"kind": "dense", "size": "s"},
             "s_dense2c": {"kind": "dense", "size": "s", "compute_scale": 2.0},
             "l_dense": {"kind": "dense", "size": "l"},
             "l_moe": {"kind": "moe", "size": "l", "activation_rate": 0.3, "top_k": 2}},
    "train": {"batch_size": 16},
}


def with_runs(**runs: dict) -> dict:
    return {**BASE, "runs": runs}


def test_each_size_plans_at_its_own_n_c_and_shape() -> None:
    p = parse_params(BASE)
    s, s2, big, moe = (plan_run(p, r) for r in ("s_dense", "s_dense2c", "l_dense", "l_moe"))
    assert (s.arch.d_model, s.arch.n_layers, s.target_params, s.compute) == (64, 2, 2.0e5, 3.0e12)
    assert (big.arch.d_model, big.arch.n_layers, big.target_params, big.compute) == (96, 3, 8.0e5, 1.2e13)
    assert big.arch.n_heads == 4 and big.arch.seq_len == 128  # the model section fills what a size leaves
    assert abs(big.arch.nonvocab_total / 8.0e5 - 1) <= 0.01 and abs(moe.arch.nonvocab_total / 8.0e5 - 1) <= 0.01
    assert moe.arch.d_model == 96 and abs(moe.arch.activation_rate / 0.3 - 1) <= 0.02
    # 2C: twice the compute, so (up to whole steps) twice the dense run's tokens, same architecture
    assert s2.compute == 6.0e12 and s2.arch == s.arch and abs(s2.tokens / s.tokens - 2) < 0.01
    d, d2 = s.to_dict(), s2.to_dict()
    assert d["size"] == "s" and "compute_scale" not in d and d2["compute_scale"] == 2.0


def test_one_size_plans_are_unchanged() -> None:
    p = parse_params({**BASE, "budget": {k: v for k, v in BASE["budget"].items() if k != "sizes"},
                      "runs": {"dense": {"kind": "dense"}}})
    d = plan_run(p, "dense").to_dict()
    assert "size" not in d and "compute_scale" not in d and d["compute"] == 3.0e12 and d["target_params"] == 2.0e5


def test_bad_sizes_name_the_field() -> None:
    with pytest.raises(ParamsError, match=r"runs\.x\.size='m' is not in budget\.sizes \['l', 's'\]"):
        parse_params(with_runs(x={"kind": "dense", "size": "m"}))
    bad = {**BASE, "budget": {**BASE["budget"], "sizes": {"l": {"params": 1e5, "compute": 1e12,
                                                                 "model": {"d_modle": 96}}}}}
    with pytest.raises(ParamsError, match=r"budget\.sizes\.l\.model\.d_modle: unknown key"):
        parse_params({**bad, "runs": {"x": {"kind": "dense"}}})
    bad["budget"]["sizes"]["l"]["model"] = {"seq_len": 256}
    with pytest.raises(ParamsError, match=r"seq_len is the study's"):
        parse_params({**bad, "runs": {"x": {"kind": "dense"}}})
    with pytest.raises(ParamsError, match=r"runs\.x\.compute_scale"):
        parse_params(with_runs(x={"kind": "dense", "compute_scale": 0}))


def test_plan_table_shows_sizes_only_when_used() -> None:
    p = parse_params(BASE)
    md = markdown(p, rows(plans_from_params(p), columns_for(p)))
    assert "| run | kind | size | d_model | n_layers | compute | compute_scale | lm_head_share | design |" in md
    assert "Size `l`: N = 800,000, C = 1.2e+13, model d_model 96, n_layers 3." in md
    one = parse_params({**BASE, "budget": {k: v for k, v in BASE["budget"].items() if k != "sizes"},
                        "runs": {"dense": {"kind": "dense"}}})
    assert columns_for(one) == COLUMNS
    assert "| run | kind | design |" in markdown(one, rows(plans_from_params(one)))


def test_gpu_study_is_valid_and_its_committed_table_is_current() -> None:
    """studies/gpu_study.yaml (issue 19): its plan is committed, and it keeps the issue's requirements."""
    import io
    from collections import Counter

    import pyarrow.parquet as pq

    from moe_study.config.load import load_params
    from moe_study.io import ROOT
    from moe_study.report.plan_table import parquet_bytes

    p = load_params(ROOT / "studies" / "gpu_study.yaml")
    plans = plans_from_params(p)
    t = rows(plans, columns_for(p))
    assert (ROOT / "results/gpu_study/plan.md").read_text() == markdown(p, t), \
        "run `python -m stages.plan_table studies/gpu_study.yaml`"
    assert pq.read_table(ROOT / "results/gpu_study/plan.parquet").to_pylist() == \
        pq.read_table(io.BytesIO(parquet_bytes(t, columns_for(p)))).to_pylist()
    assert p.budget.unique_tokens >= 50_000_000 and p.budget.compute_convention == "exact"
    sizes = {x["size"]: x["target_params"] for x in plans}
    assert sizes["l"] >= 3 * sizes["s"]
    for x in plans:
        run = p.run(x["run"])
        assert abs(x["params_rel_dev"]) <= 0.01 and (x["rate_rel_dev"] is None or abs(x["rate_rel_dev"]) <= 0.02)
        if x["arch"]["kind"] == "dense":  # reads U once at C (twice at 2C), whole steps
            assert 1.0 <= x["epochs"] / run.compute_scale <= 1.001
        if x["arch"]["kind"] == "dense" and x["size"] == "s":
            assert x["tokens"] / x["nonvocab_params"] >= 10 * run.compute_scale
    for size in ("s", "l"):
        moe = [x for x in plans if x["size"] == size and x["arch"]["kind"] == "moe"]
        rates = sorted({round(x["activation_rate"], 3) for x in moe})
        assert len(rates) >= 7 and rates[0] < 0.09 and rates[-1] > 0.57
        assert len({x["arch"]["ffn_hidden"] for x in moe}) == 1  # one routed expert width per size
    seeds = Counter((p.run(r).group, p.run(r).seed) for r in p.runs)
    per_group = Counter(g for g, _ in seeds)
    assert all(n >= 2 for n in per_group.values())
    assert all(per_group[g] >= 3 for g in ("s_dense", "l_dense", "s_r20", "l_r21"))


def test_gpu_study_expands_to_a_loadable_params_file(tmp_path) -> None:
    """--expand of a grid over runs with a list field (vary) used to dump YAML anchors, which load refuses."""
    from moe_study.config.load import expanded_text, load_params
    from moe_study.io import ROOT

    out = tmp_path / "params.yaml"
    out.write_text(expanded_text(ROOT / "studies" / "gpu_study.yaml"))
    p = load_params(out)
    assert len(p.runs) == 72 and p.run("s_r09_s0_lr1e-2").vary == ["experts", "top_k"]
