"""tasks: zero-shot tasks built from the held-out documents, and how a model is scored on them.

Why built here and not downloaded: the study's models are tiny and trained on one corpus, the
machines have no hub access, and items drawn from the deduplicated held-out split can never have
been trained on. Two tasks, both in the form lm-evaluation-harness uses for LAMBADA and HellaSwag:

- **cloze** (LAMBADA-style last word): a sentence-final word (letters, at least 3, preceded by a
  space and followed by `.`, `!` or `?`) to predict from everything before it in its document.
  Correct when every token of " word" is the model's argmax given the context (greedy match).
- **choice** (HellaSwag-style, 4-way): a context of whole words of a document and four endings of
  `eval.choice_words` words: the true continuation and three spans of the same length at random
  offsets of three *other* held-out documents. Endings are whitespace-normalised (" w1 w2 ...") so
  line breaks cannot give the answer away. A target or ending longer than half of `model.seq_len`
  tokens is left out, so every item keeps context in the model's window. The model picks the ending with the highest
  log-likelihood per UTF-8 byte (length-normalised, the harness's `acc_norm`). Chance is 1/4.

Determinism: candidates are enumerated in document order; numpy's PCG64 seeded by
`eval.task_seed` draws `eval.task_items` of them without replacement (all of them when there are
fewer), then the distractors and the position of the true ending. Same held-out set, tokenizer and
params: byte-identical files.

Outputs (work/tasks/): `cloze.jsonl`, `choice.jsonl` (one item per line, sorted by id, with the
text for the lm-eval adapter and the token ids that evaluate@run scores) and `manifest.json`.
Accuracy intervals are Wilson 95% intervals (items are the independent units).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import WORK, fail, provenance, setup_logging, sha256_file, write_bytes, write_json
from stages.heldout import HeldoutError, load_heldout
from stages.schema import EvalConfig, Params, ParamsError, load_params
from stages.stats import wilson

TASKS = ("cloze", "choice")
CHOICES = 4
TASKS_DIR = WORK / "tasks"
# a word of >= 3 letters after a space, directly followed by sentence-final punctuation
SENTENCE_END = re.compile(r"(?<= )([A-Za-z][A-Za-z'-]*[A-Za-z])(?=[.!?](?:\s|$))")
WORD = re.compile(r"\S+")

log = logging.getLogger("stages.tasks")


class TaskError(ValueError):
    """Task files or requests that cannot be built or scored (the message names the file or item)."""


# ------------------------------------------------------------------------------------- building
def _n_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []


def cloze_items(texts: Sequence[tuple[int, str]], cfg: EvalConfig, tokenizer: Any,
                max_tokens: int) -> list[dict[str, Any]]:
    """Seeded sample of sentence-final words with at least min_context_words words before them.

    A word of more than `max_tokens` tokens is no candidate (the context must keep room in seq_len).
    """
    cands = []
    for doc, text in texts:
        for m in SENTENCE_END.finditer(text):
            context = text[:m.start() - 1]  # the space before the word belongs to the target
            if len(context.split()) >= cfg.min_context_words:
                cands.append((doc, m.start(), context, " " + m.group(1)))
    cands = [c for c, n in zip(cands, _n_tokens(tokenizer, [c[3] for c in cands]), strict=True) if n <= max_tokens]
    rng = np.random.default_rng([cfg.task_seed, 1])
    take = np.sort(rng.choice(len(cands), size=min(cfg.task_items, len(cands)), replace=False))
    return [{"id": f"cloze-{doc}-{pos}", "doc": doc, "context": ctx, "target": tgt}
            for doc, pos, ctx, tgt in (cands[i] for i in take.tolist())]


def choice_items(texts: Sequence[tuple[int, str]], cfg: EvalConfig, tokenizer: Any,
                 max_tokens: int) -> list[dict[str, Any]]:
    """Seeded sample of (context, true ending) split points; 3 distractor spans from other docs.

    Every ending has at most `max_tokens` tokens; a distractor that does not fit is drawn again.
    """
    L = cfg.choice_words
    words = {doc: list(WORD.finditer(text)) for doc, text in texts}
    texts_by_doc = dict(texts)

    def span(doc: int, start: int) -> str:
        return " " + " ".join(m.group() for m in words[doc][start:start + L])

    cands = [(doc, k) for doc, ws in words.items() for k in range(cfg.min_context_words, len(ws) - L + 1, L)]
    cands = [c for c, n in zip(cands, _n_tokens(tokenizer, [span(*c) for c in cands]), strict=True)
             if n <= max_tokens]
    donors = [doc for doc, ws in words.items() if len(ws) >= L]
    if len(donors) < CHOICES:
        raise TaskError(f"only {len(donors)} held-out documents have {L} words (eval.choice_words); "
                        f"the choice task needs {CHOICES}")
    rng = np.random.default_rng([cfg.task_seed, 2])
    take = np.sort(rng.choice(len(cands), size=min(cfg.task_items, len(cands)), replace=False))
    items = []
    for doc, k in (cands[i] for i in take.tolist()):
        endings = [span(doc, k)]
        for _ in range(1000 * CHOICES):
            if len(endings) == CHOICES:
                break
            other = donors[int(rng.integers(len(donors)))]
            cand = span(other, int(rng.integers(len(words[other]) - L + 1)))
            if other != doc and cand not in endings and _n_tokens(tokenizer, [cand])[0] <= max_tokens:
                endings.append(cand)
        else:
            raise TaskError(f"choice item {doc}/{k}: no 3 distinct distractors of <= {max_tokens} tokens "
                            f"(lower eval.choice_words)")
        label = int(rng.integers(CHOICES))
        endings[0], endings[label] = endings[label], endings[0]
        items.append({"id": f"choice-{doc}-{k}", "doc": doc,
                      "context": texts_by_doc[doc][:words[doc][k - 1].end()], "endings": endings, "label": label})
    return items


def encode_items(items: list[dict[str, Any]], tokenizer: Any) -> None:
    """Add token ids (as the token shards would hold them) to the items, in place."""
    def enc(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []

    for item, ids in zip(items, enc([it["context"] for it in items]), strict=True):
        item["context_ids"] = ids
    if items and "target" in items[0]:
        for item, ids in zip(items, enc([it["target"] for it in items]), strict=True):
            item["target_ids"] = ids
    elif items:
        flat = enc([e for it in items for e in it["endings"]])
        for i, item in enumerate(items):
            item["ending_ids"] = flat[CHOICES * i:CHOICES * (i + 1)]
            item["ending_bytes"] = [len(e.encode()) for e in item["endings"]]


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(it, sort_keys=True, ensure_ascii=False) + "\n" for it in items).encode()


def read_items(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise TaskError(f"{path}: missing (run the tasks stage)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: corrupt JSONL ({err})") from None


def build_tasks(p: Params, work: Path = WORK, out: Path | None = None) -> dict[str, Any]:
    """The stage: decode the held-out docs, build and encode both tasks, write them and the manifest."""
    from stages.tokenize import load_tokenizer, token_manifest

    out = out or work / "tasks"
    cfg = p.eval
    tokens_dir, split_path = work / "tokens", work / "split" / "split.parquet"
    tok = load_tokenizer(tokens_dir)
    docs = load_heldout(tokens_dir, split_path)
    texts = [(d.doc, tok.decode(d.tokens.tolist(), skip_special_tokens=False)) for d in docs]
    room = p.model.seq_len // 2  # a continuation leaves at least half of the window to its context
    built = {"cloze": cloze_items(texts, cfg, tok, room), "choice": choice_items(texts, cfg, tok, room)} \
        if cfg.task_items else {t: [] for t in TASKS}
    manifest: dict[str, Any] = {"heldout_docs": len(docs), "tasks": {}}
    for name, items in built.items():
        encode_items(items, tok)
        write_bytes(out / f"{name}.jsonl", jsonl(items))
        manifest["tasks"][name] = {"file": f"{name}.jsonl", "items": len(items),
                                   "docs": len({it["doc"] for it in items}),
                                   "sha256": sha256_file(out / f"{name}.jsonl")}
        if 0 < len(items) < cfg.task_items:
            log.warning("%s: only %d candidate items in the held-out set (eval.task_items=%d)", name, len(items),
                        cfg.task_items)
    tm = token_manifest(tokens_dir)
    params = {k: v for k, v in cfg.model_dump().items() if k.startswith(("task_", "choice_", "min_context"))}
    params["max_continuation_tokens"] = room
    manifest["provenance"] = provenance("tasks", {"tokens": tm["sha256"], "split": sha256_file(split_path)}, params,
                                        ["stages.heldout", "stages.tokenize", "stages.stats"])
    write_json(out / "manifest.json", manifest)
    log.info("tasks: %s from %d held-out docs", ", ".join(f"{k} {v['items']} items" for k, v in
                                                          manifest["tasks"].items()), len(docs))
    return manifest


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    setup_logging("tasks")
    try:
        build_tasks(load_params(a.params))
    except (ParamsError, HeldoutError, TaskError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
