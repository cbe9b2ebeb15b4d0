"""Scoring a model on the zero-shot tasks (built by moe_study.data.tasks): accuracy with Wilson intervals.

The log-probabilities come from the study's one scoring loop (moe_study.evaluation.scoring), the
same that scores the held-out loss, so a task and the loss read a model the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moe_study.data.tasks import CHOICES, read_items
from moe_study.evaluation.scoring import score_continuations
from moe_study.evaluation.stats import wilson


def _result(correct: np.ndarray, chance: float, **extra: Any) -> dict[str, Any]:
    n, k = len(correct), int(correct.sum())
    return {"items": n, "correct": k, "acc": k / n if n else None, "acc_ci": wilson(k, n), "chance": chance, **extra}


def evaluate_tasks(model: Any, tasks_dir: Path, eos_id: int, batch_size: int, device: Any = "cpu") -> dict[str, Any]:
    """Accuracy of `model` on both tasks of `tasks_dir` (an empty task gives items 0, acc None)."""
    cloze = read_items(tasks_dir / "cloze.jsonl")
    choice = read_items(tasks_dir / "choice.jsonl")
    out: dict[str, Any] = {}
    lp, greedy = score_continuations(model, [(it["context_ids"], it["target_ids"]) for it in cloze], eos_id,
                                     batch_size, device)
    out["cloze"] = _result(greedy, 0.0, mean_target_logprob=float(lp.mean()) if len(lp) else None,
                           scoring="greedy match of every token of ' word' given the context")
    reqs = [(it["context_ids"], e) for it in choice for e in it["ending_ids"]]
    lp, _ = score_continuations(model, reqs, eos_id, batch_size, device)
    per_byte = lp.reshape(-1, CHOICES) / np.array([it["ending_bytes"] for it in choice], dtype=np.float64).reshape(
        -1, CHOICES) if choice else np.zeros((0, CHOICES))
    labels = np.array([it["label"] for it in choice], dtype=np.int64)
    out["choice"] = _result(per_byte.argmax(axis=1) == labels, 1 / CHOICES,
                            scoring="argmax over 4 endings of log-likelihood per UTF-8 byte")
    return out
