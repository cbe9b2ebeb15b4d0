"""Accounting against measurement: the formulas of moe_study/accounting.py vs what can be counted.

For every run of a params file: non-vocab parameters of the planned architecture vs the built
torch module, and training FLOPs per token (exact convention: every matmul, LM head and full S x S
attention included) vs torch.utils.flop_counter.FlopCounterMode on one forward + backward. For
each public config in tests/data/hf_configs: total / active parameters vs the published figures.

    python bench/accounting_check.py --out results/bench/accounting_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_study.accounting import count_summary, from_hf_config, plan_run  # noqa: E402
from moe_study.config.load import load_params  # noqa: E402
from moe_study.model.lm import build_model, count_nonvocab_params  # noqa: E402
from moe_study.train.audit import measure_flops_per_token  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {"llama-2-7b-hf.json": (6.74e9, 6.74e9), "mixtral-8x7b-v0.1.json": (46.7e9, 12.9e9),
             "qwen1.5-moe-a2.7b.json": (14.3e9, 2.7e9), "deepseek-moe-16b-base.json": (16.4e9, 2.8e9),
             "olmoe-1b-7b-0924.json": (6.9e9, 1.3e9)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench/accounting_check.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    p = load_params(a.params)
    V = p.tokenizer.vocab_size
    runs = []
    for r in sorted(p.runs):
        arch = plan_run(p, r).arch
        model = build_model(arch, V)
        total, active = count_nonvocab_params(model)
        measured = measure_flops_per_token(model)
        formula = arch.train_flops_per_token("exact", V)
        runs.append({"run": r, "nonvocab_formula": arch.nonvocab_total, "nonvocab_module": total,
                     "active_formula": arch.nonvocab_active, "active_module": active,
                     "flops_formula": formula, "flops_counter": measured, "flops_rel_dev": measured / formula - 1})
    published = []
    for name, (tot, act) in PUBLISHED.items():
        s = count_summary(*from_hf_config(json.loads((ROOT / "tests/data/hf_configs" / name).read_text())))
        published.append({"config": name, "total": s["total_params"], "total_published": tot,
                          "total_rel_dev": s["total_params"] / tot - 1, "active": s["active_params"],
                          "active_published": act, "active_rel_dev": s["active_params"] / act - 1})
    out = {"command": "python bench/accounting_check.py --params " + a.params, "torch": torch.__version__,
           "machine": platform.machine(), "vocab_size": V, "runs": runs, "published": published}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Accounting check (`{out['command']}`, torch {torch.__version__})", "",
          "| run | N formula | N module | N_active formula | N_active module | FLOPs/token formula | "
          "FLOPs/token flop counter | dev |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {x['run']} | {x['nonvocab_formula']:,} | {x['nonvocab_module']:,} | {x['active_formula']:,} | "
           f"{x['active_module']:,} | {x['flops_formula']:,.0f} | {x['flops_counter']:,.0f} | "
           f"{x['flops_rel_dev']:+.3%} |" for x in runs]
    md += ["", "| config | total | published | dev | active | published | dev |", "|---|---|---|---|---|---|---|"]
    md += [f"| {x['config']} | {x['total'] / 1e9:.3f}B | {x['total_published'] / 1e9:g}B | {x['total_rel_dev']:+.2%} | "
           f"{x['active'] / 1e9:.3f}B | {x['active_published'] / 1e9:g}B | {x['active_rel_dev']:+.2%} |"
           for x in published]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
