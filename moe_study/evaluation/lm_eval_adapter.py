"""A thin lm-evaluation-harness adapter: a trained run as an `lm_eval` LM, on local task files.

Why: the study's own tasks (stages/tasks.py) need no download, but any task the harness knows
can then be run on the same model: a YAML task over a local JSONL (`dataset_path: json`) works
offline. The adapter only turns strings into the project's token ids; scoring is the project's
`moe_study.evaluation.scoring.score_continuations` (each request alone, as EOS + context + continuation), so the
harness and `evaluate@run` agree on the same items (tests/test_lm_eval.py checks it).

    python -m moe_study.evaluation.lm_eval_adapter --run dense_s0 --export-study-tasks work/lm_eval  # tasks
    python -m moe_study.evaluation.lm_eval_adapter --run dense_s0 --include-path work/lm_eval \\
        --tasks moe_eq_cloze,moe_eq_choice [--limit 100] [--out work/lm_eval/dense_s0.json]

or from Python: `lm_eval.simple_evaluate(model=ProjectLM("work/runs/x/model"), tasks=[...],
task_manager=lm_eval.tasks.TaskManager(include_path=..., include_defaults=False))`.

Request semantics (those of the harness's HF backend): loglikelihood encodes context + continuation
together and splits at the context's tokens (trailing spaces of the context move to the
continuation); loglikelihood_rolling scores every token once in disjoint windows of seq_len with
EOS as the prefix; generate_until decodes greedily until a stop string, EOS or max_gen_toks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from moe_study.evaluation.scoring import score_continuations
from moe_study.io import write_bytes, write_json
from moe_study.model.lm import load_model

DEFAULT_MAX_GEN_TOKS = 32


class ProjectLM(LM):
    """The project's model + tokenizer behind lm_eval's LM interface (CPU or CUDA, float32)."""

    def __init__(self, model_dir: str | Path, tokens_dir: str | Path = "work/tokens", tokenizer: Any = None,
                 batch_size: int | str = 16, device: str | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        super().__init__()
        if tokenizer is None:
            from moe_study.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokens_dir)
        self.tokenizer = tokenizer
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, config = load_model(model_dir, device=self._device)
        self.model.eval()
        if "eos_id" not in config:  # the document separator the model was trained with; no safe default
            raise ValueError(f"{Path(model_dir) / 'config.json'}: no eos_id (not a model saved by the train stage?)")
        self.eos_id = int(config["eos_id"])
        self.seq_len = self.model.arch.seq_len
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.model_dir = str(model_dir)

    # ---------------------------------------------------------------------------------- encoding
    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else []

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return whole[:len(ctx)], whole[len(ctx):]

    # -------------------------------------------------------------------------------- LM methods
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        lp, greedy = score_continuations(self.model, pairs, self.eos_id, self.batch_size, self._device)
        return [(float(a), bool(b)) for a, b in zip(lp, greedy, strict=True)]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eos_id, max_seq_len=self.seq_len, context_len=1)]
            if not windows:
                out.append(0.0)
                continue
            lp, _ = score_continuations(self.model, windows, self.eos_id, self.batch_size, self._device,
                                        prepend_eos=False)
            out.append(float(lp.sum()))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = [self.eos_id, *self.tok_encode(context)]
            new: list[int] = []
            text = ""
            for _ in range(budget):
                x = torch.tensor([(ids + new)[-self.seq_len:]], dtype=torch.long, device=self._device)
                nxt = int(self.model(x).logits[0, -1].argmax())
                if nxt == self.eos_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u, 1)[0]
            out.append(text)
        return out

    def get_model_info(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "arch": self.model.arch.__dict__}


# ------------------------------------------------------------------------------- study task YAMLs
def study_task_yamls(tasks_dir: Path | str) -> dict[str, str]:
    """lm_eval task configs for the tasks stage's cloze.jsonl / choice.jsonl (absolute data paths)."""
    tasks_dir = Path(tasks_dir).resolve()

    def head(name: str, file: str) -> str:
        return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks_dir / file}\n"
                f"test_split: test\ndoc_to_text: context\ntarget_delimiter: \"\"\n")

    return {
        "moe_eq_cloze": head("moe_eq_cloze", "cloze.jsonl")
        + "output_type: loglikelihood\ndoc_to_target: target\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        "moe_eq_choice": head("moe_eq_choice", "choice.jsonl")
        + "output_type: multiple_choice\ndoc_to_choice: endings\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
    }


def write_study_tasks(tasks_dir: Path | str, out_dir: Path | str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in study_task_yamls(tasks_dir).items():
        write_bytes(out_dir / f"{name}.yaml", text.encode())
        paths.append(out_dir / f"{name}.yaml")
    return paths


def run_harness(lm: ProjectLM, tasks: list[str], include_path: str | Path, limit: int | None = None,
                bootstrap_iters: int = 0) -> dict[str, Any]:
    """simple_evaluate on local tasks only (no built-in task index, no network); returns results."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=False,
                                  bootstrap_iters=bootstrap_iters)
    return res["results"]


def run_harness_hf(hf_dir: str | Path, tasks: list[str], include_path: str | Path, limit: int | None = None,
                   batch_size: int = 16, device: str = "cpu", bootstrap_iters: int = 0) -> dict[str, Any]:
    """The harness's own `hf` backend (transformers, no project code) on a checkpoint written by
    `python -m stages.export` (moe_study/hf.py), on local tasks; returns results. Its tokenizer prepends
    EOS as the project's scoring does, so the accuracies equal ProjectLM's (tests/test_export.py)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={Path(hf_dir).resolve()},dtype=float32",
                                  tasks=tasks, task_manager=tm, limit=limit, log_samples=False, device=device,
                                  batch_size=batch_size, bootstrap_iters=bootstrap_iters)
    return res["results"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run name (its model is work/runs/<run>/model)")
    ap.add_argument("--work", default="work")
    ap.add_argument("--export-study-tasks", metavar="DIR", help="write YAMLs for work/tasks/*.jsonl into DIR")
    ap.add_argument("--include-path", help="folder of lm_eval task YAMLs")
    ap.add_argument("--tasks", help="comma-separated task names")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--hf", metavar="DIR", help="evaluate the exported checkpoint in DIR (python -m stages.export) "
                    "with the harness's own hf backend instead of the project's model")
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.export_study_tasks:
        for p in write_study_tasks(work / "tasks", a.export_study_tasks):
            print(p)
        if not a.tasks:
            return 0
    if not (a.tasks and (a.include_path or a.export_study_tasks)):
        ap.error("--tasks and --include-path (or --export-study-tasks) are needed to evaluate")
    include = a.include_path or a.export_study_tasks
    if a.hf:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        results = run_harness_hf(a.hf, a.tasks.split(","), include, a.limit, a.batch_size, device)
    else:
        lm = ProjectLM(work / "runs" / a.run / "model", work / "tokens", batch_size=a.batch_size)
        results = run_harness(lm, a.tasks.split(","), include, a.limit)
    if a.out:
        write_json(a.out, results)
    print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
