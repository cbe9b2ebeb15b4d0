"""plan@run: the equal-resource configuration of one run.

Every run gets the same budget (non-vocab params N, compute C, unique tokens U); the planner
(moe_study/accounting.py) solves the run's expert count, top-k and widths to hit N within
budget.params_tol (and its activation rate within budget.rate_tol, for MoE) and gives it
T_i = C / F_i training tokens (F_i its FLOPs per token under budget.compute_convention), rounded
down to whole optimizer steps. The plan is per run so that editing one run re-plans only that run.

Also: `python -m stages.plan count CONFIG.json` prints one JSON line of parameter and FLOP counts
of a Hugging Face config.json (Llama, Mistral, Mixtral, Qwen2(-MoE), DeepSeek-MoE, OLMoE) or of a
trained run's model/config.json. The study's plan table is its own stage, `python -m stages.plan_table`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moe_study.accounting import PlanError, plan_run
from moe_study.cli import fail, per_run_main
from moe_study.config.schema import Params
from moe_study.hashing import sha256_file
from moe_study.io import WORK, read_json, write_json
from moe_study.provenance import provenance

SPLIT_MANIFEST = WORK / "split" / "manifest.json"
log = logging.getLogger("stages.plan")


def plan_path(run: str) -> Path:
    return WORK / "runs" / run / "plan.json"


def order_seed(p: Params, run: str) -> int:
    """The run's data-order seed: its seed when train.vary_data_order (seed 0 keeps the study's order), else 0."""
    return p.run_seed(run) if p.train.vary_data_order else 0


def make_plan(p: Params, run: str, split_manifest: Path = SPLIT_MANIFEST) -> dict:
    plan = plan_run(p, run).to_dict()
    split = read_json(split_manifest)
    available = int(split["train_tokens"])
    if p.budget.unique_tokens > available:
        raise PlanError(
            f"budget.unique_tokens={p.budget.unique_tokens} exceeds the {available} training tokens left "
            f"after dedupe and split ({split_manifest}); lower it or add corpus sources"
        )
    plan["data_seed"] = p.seed
    plan["order_seed"] = order_seed(p, run)
    plan["train_tokens_available"] = available
    # Record only the run fields the plan uses: a learning-rate edit then leaves plan.json
    # byte-identical, so DVC re-runs no replay for it (Snakemake re-plans, then re-trains that run).
    # The seed enters through order_seed only (seed 0, or train.vary_data_order off: 0).
    # size / compute_scale / budget.sizes only when used: a one-size study's plan.json stays as it was before them
    r = p.run(run)
    arch_fields = r.model_dump(exclude={"lr", "lr_grid", "seed", "group"}
                               | ({"size"} if r.size is None else set())
                               | ({"compute_scale"} if r.compute_scale == 1 else set()))
    budget = p.budget.model_dump(exclude=None if p.budget.sizes else {"sizes"})
    section = {"seed": p.seed, "budget": budget, "model": p.model.model_dump(),
               "tokenizer.vocab_size": p.tokenizer.vocab_size, "train.batch_size": p.train.batch_size,
               "order_seed": plan["order_seed"], f"runs.{run}": arch_fields}
    plan["provenance"] = provenance("plan", {"split_manifest": sha256_file(split_manifest)}, section)
    return plan


def write_plan(p: Params, run: str) -> None:
    plan = make_plan(p, run)
    write_json(plan_path(run), plan)
    log.info(
        "%s: %s N=%d N_active=%d r_a=%.3f tokens=%d (%.2f epochs of U=%d) steps=%d",
        run, plan["arch"]["kind"], plan["nonvocab_params"], plan["nonvocab_active"],
        plan["activation_rate"], plan["tokens"], plan["epochs"], plan["unique_tokens"], plan["steps"],
    )


def count_main(argv: list[str]) -> int:
    """`python -m stages.plan count CONFIG.json [--seq-len S]`: one JSON line of counts (published convention)."""
    import argparse
    import dataclasses
    import json

    from moe_study.accounting import ConfigError, count_summary, read_count_config

    ap = argparse.ArgumentParser(prog="python -m stages.plan count", description="parameter and FLOP counts")
    ap.add_argument("config", help="a Hugging Face config.json, or work/runs/<run>/model/config.json")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="context for the FLOPs' attention term (default: the config's max_position_embeddings)")
    a = ap.parse_args(argv)
    if not Path(a.config).is_file():
        fail(f"{a.config}: no such file (give a Hugging Face config.json)")
    if a.seq_len is not None and not 0 < a.seq_len <= 1 << 24:
        fail(f"--seq-len={a.seq_len}: must be between 1 and {1 << 24}")
    try:
        arch, vocab = read_count_config(read_json(a.config))
    except (ConfigError, ValueError) as err:
        fail(f"{a.config}: {err}")
    if a.seq_len:
        arch = dataclasses.replace(arch, seq_len=a.seq_len)
    print(json.dumps({"config": a.config, **count_summary(arch, vocab)}, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "count":
        return count_main(args[1:])
    return per_run_main("plan", __doc__, write_plan, (PlanError,), argv)


if __name__ == "__main__":
    raise SystemExit(main())
