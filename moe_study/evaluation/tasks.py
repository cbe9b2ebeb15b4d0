"""Scoring a model on the zero-shot tasks (built by moe_study.data.tasks): accuracy with Wilson intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_study.data.tasks import CHOICES, TaskError, read_items
from moe_study.evaluation.stats import wilson


# -------------------------------------------------------------------------------------- scoring
def score_continuations(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], eos_id: int,
                        batch_size: int, device: Any = "cpu",
                        prepend_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """log p(continuation | EOS + context) and whether it is the greedy argmax, per request.

    Each request is scored alone (no other text in its rows), after an EOS as a document starts in
    training (`prepend_eos=False` for contexts that carry their own prefix, e.g. rolling windows);
    a context longer than the model's seq_len loses its oldest tokens. Requests are sorted longest
    first into batches of similar length, so padding costs little and the order (so every float)
    is fixed.
    """
    import torch

    seq_len = model.arch.seq_len
    prepared = []
    for i, (ctx, cont) in enumerate(requests):
        if not 1 <= len(cont) <= seq_len:
            raise TaskError(f"request {i}: continuation of {len(cont)} tokens (must be 1..seq_len={seq_len})")
        seq = [eos_id, *ctx, *cont] if prepend_eos else [*ctx, *cont]
        if len(seq) < 2:
            raise TaskError(f"request {i}: nothing to condition on (empty context and prepend_eos=False)")
        prepared.append((i, seq[-(seq_len + 1):], len(cont)))
    prepared.sort(key=lambda t: (-len(t[1]), t[0]))
    logprob = np.zeros(len(prepared), dtype=np.float64)
    greedy = np.zeros(len(prepared), dtype=bool)
    model.eval()
    with torch.no_grad():
        for b in range(0, len(prepared), batch_size):
            chunk = prepared[b:b + batch_size]
            width = len(chunk[0][1]) - 1
            x = torch.full((len(chunk), width), eos_id, dtype=torch.long)
            for r, (_, seq, _) in enumerate(chunk):
                x[r, :len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
            nxt = torch.zeros((len(chunk), width), dtype=torch.long)  # the token each position predicts
            for r, (_, seq, _) in enumerate(chunk):
                nxt[r, :len(seq) - 1] = torch.tensor(seq[1:], dtype=torch.long)
            nxt = nxt.to(device)
            logp = torch.log_softmax(model(x.to(device)).logits.float(), dim=-1)
            # reduce over the vocabulary on the device: only (batch, width) values cross to the host
            tok_logp = logp.gather(-1, nxt[..., None])[..., 0].cpu()
            is_argmax = (logp.argmax(-1) == nxt).cpu()
            for r, (i, seq, n) in enumerate(chunk):
                end = len(seq) - 1  # inputs 0..end-1 predict seq[1..end]; the continuation is seq[end-n+1..]
                logprob[i] = float(tok_logp[r, end - n:end].double().sum())
                greedy[i] = bool(is_argmax[r, end - n:end].all())
    return logprob, greedy


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
