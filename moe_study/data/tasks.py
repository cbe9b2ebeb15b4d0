"""Zero-shot tasks built from the held-out documents (scored by moe_study.evaluation.tasks).

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

import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_study.config.schema import EvalConfig, Params
from moe_study.data.heldout import load_heldout
from moe_study.hashing import sha256_file, verify_listed
from moe_study.io import WORK, write_bytes, write_json
from moe_study.provenance import provenance

TASKS = ("cloze", "choice")
CHOICES = 4
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
    # Candidates hold positions, not context strings: a copy of the prefix per sentence end was quadratic in a
    # document's length (a 1 MB held-out file, e.g. a generated .pyi, made GBs of strings). The context of a
    # word at `pos` is text[:pos - 1] (the space before the word belongs to the target); it has at least
    # min_context_words words (str.split's) iff the min_context_words-th word starts before pos - 1.
    cands = []
    texts_by_doc = dict(texts)
    for doc, text in texts:
        starts = [i for i, _ in zip(_word_starts(text), range(cfg.min_context_words), strict=False)]
        if len(starts) < cfg.min_context_words:
            continue
        for m in SENTENCE_END.finditer(text):
            if starts[-1] < m.start() - 1:
                cands.append((doc, m.start(), " " + m.group(1)))
    cands = [c for c, n in zip(cands, _n_tokens(tokenizer, [c[2] for c in cands]), strict=True) if n <= max_tokens]
    rng = np.random.default_rng([cfg.task_seed, 1])
    take = np.sort(rng.choice(len(cands), size=min(cfg.task_items, len(cands)), replace=False))
    return [{"id": f"cloze-{doc}-{pos}", "doc": doc, "context": texts_by_doc[doc][:pos - 1], "target": tgt}
            for doc, pos, tgt in (cands[i] for i in take.tolist())]


def _word_starts(text: str) -> Iterator[int]:
    """Start offsets of the words of `text` as str.split() finds them (runs of non-whitespace)."""
    prev_space = True
    for i, ch in enumerate(text):
        if ch.isspace():
            prev_space = True
        elif prev_space:
            prev_space = False
            yield i


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
    verify_listed(path)
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: corrupt JSONL ({err})") from None


def build_tasks(p: Params, work: Path = WORK, out: Path | None = None) -> dict[str, Any]:
    """The stage: decode the held-out docs, build and encode both tasks, write them and the manifest."""
    from moe_study.data.tokenizer import load_tokenizer, token_manifest

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
    manifest["provenance"] = provenance("tasks", {"tokens": tm["sha256"], "split": sha256_file(split_path)}, params)
    write_json(out / "manifest.json", manifest)
    log.info("tasks: %s from %d held-out docs", ", ".join(f"{k} {v['items']} items" for k, v in
                                                          manifest["tasks"].items()), len(docs))
    return manifest
