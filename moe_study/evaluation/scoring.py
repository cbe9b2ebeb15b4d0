"""The one scoring loop: summed log-probabilities of target tokens under a trained model, batched.

Why one loop: held-out loss (moe_study.evaluation.heldout_loss), the zero-shot tasks
(moe_study.evaluation.tasks) and the lm-evaluation-harness adapter all ask the same question of a
model: "given these tokens, how likely are the next ones?". Two loops that batch, pad and reduce
differently can drift apart (a padding or offset fix in one and not the other) and the study's
numbers would then stop being comparable; one loop keeps them defined the same way.

A request is a row of tokens `seq` and a count n: the model reads seq[:-1] and predicts seq[1:],
and the last n predictions are the targets. Each request is scored alone (no other text in its
row). Requests are sorted longest first (ties by request index) into batches of `batch_size`, so
padding wastes little and the batches, hence every float, are fixed by the requests alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from moe_study.cli import progress
from moe_study.data.tasks import TaskError

Request = tuple[Sequence[int] | np.ndarray, int]  # (seq: inputs seq[:-1], predictions seq[1:]; n targets, the last)


class Scores(NamedTuple):
    """Per request, in request order: summed log-prob of its targets (nats, float64), their count,
    and whether every target is the model's argmax (greedy decoding would produce it)."""

    logprob: np.ndarray
    count: np.ndarray
    greedy: np.ndarray


@torch.no_grad()
def score_requests(model: Any, requests: Sequence[Request], pad_id: int, batch_size: int,
                   device: Any = "cpu", sum_on_host: bool = False, desc: str = "score") -> Scores:
    """Score every request; see the module docstring for what a request is and how batches are made.

    Rows are padded after their end with `pad_id` (the model is causal, so padding never reaches a
    scored position). The target log-probs are float32 (the model's logits in float32, log-softmax
    over the vocabulary on the device); each row's sum is float64 over the full padded width with
    non-targets zeroed (adding zeros changes no bit: the sum equals the sum over the targets alone).

    `sum_on_host`: where that float64 row sum runs. On CUDA a device reduction and a host reduction
    of the same values can differ in the last bit; the held-out loss has always summed on the
    device (only one float per row crosses to the host) and the tasks on the host, and each keeps
    its place so that no number of the study moves. On CPU the two are the same.
    """
    prepared: list[tuple[int, np.ndarray, int]] = []
    for i, (seq, n) in enumerate(requests):
        row = np.asarray(seq, dtype=np.int64)
        if not 1 <= n <= len(row) - 1:
            raise ValueError(f"request {i}: {n} targets in a row of {len(row)} tokens (must be 1..{len(row) - 1})")
        prepared.append((i, row, int(n)))
    prepared.sort(key=lambda t: (-len(t[1]), t[0]))
    logprob = np.zeros(len(prepared), dtype=np.float64)
    count = np.zeros(len(prepared), dtype=np.int64)
    greedy = np.zeros(len(prepared), dtype=bool)
    model.eval()
    batches = range(0, len(prepared), batch_size)
    for b in progress(batches, total=len(batches), desc=desc, unit="batch"):
        chunk = prepared[b:b + batch_size]
        width = len(chunk[0][1]) - 1
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        nxt = torch.zeros((len(chunk), width), dtype=torch.long)  # the token each position predicts
        target = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, (_, row, n) in enumerate(chunk):
            end = len(row) - 1  # inputs 0..end-1 predict row[1..end]; the targets are the last n
            x[r, :end] = torch.from_numpy(row[:-1])
            nxt[r, :end] = torch.from_numpy(row[1:])
            target[r, end - n:end] = True
        nxt, target = nxt.to(device), target.to(device)
        logp = torch.log_softmax(model(x.to(device)).logits.float(), dim=-1)
        # reduce over the vocabulary on the device: only (batch, width) values cross to the host
        tok_logp = logp.gather(-1, nxt[..., None])[..., 0].masked_fill(~target, 0.0)
        if sum_on_host:
            tok_logp = tok_logp.cpu()
        row_sum = tok_logp.double().sum(dim=1).cpu().numpy()
        row_greedy = ((logp.argmax(-1) == nxt) | ~target).all(dim=1).cpu().numpy()
        for r, (i, _, n) in enumerate(chunk):
            logprob[i], count[i], greedy[i] = row_sum[r], n, row_greedy[r]
    return Scores(logprob, count, greedy)


def score_continuations(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], eos_id: int,
                        batch_size: int, device: Any = "cpu",
                        prepend_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """log p(continuation | EOS + context) and whether it is the greedy argmax, per (context, continuation).

    Each request is scored alone, after an EOS as a document starts in training (`prepend_eos=False`
    for contexts that carry their own prefix, e.g. the harness's rolling windows); a context longer
    than the model's seq_len loses its oldest tokens.
    """
    seq_len = model.arch.seq_len
    rows: list[Request] = []
    for i, (ctx, cont) in enumerate(requests):
        if not 1 <= len(cont) <= seq_len:
            raise TaskError(f"request {i}: continuation of {len(cont)} tokens (must be 1..seq_len={seq_len})")
        seq = [eos_id, *ctx, *cont] if prepend_eos else [*ctx, *cont]
        if len(seq) < 2:
            raise TaskError(f"request {i}: nothing to condition on (empty context and prepend_eos=False)")
        rows.append((seq[-(seq_len + 1):], len(cont)))
    scores = score_requests(model, rows, eos_id, batch_size, device, sum_on_host=True, desc="tasks")
    return scores.logprob, scores.greedy
