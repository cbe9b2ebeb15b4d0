"""The zero-shot tasks: how items are drawn from held-out text, and how a model is scored on them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from task_helpers import EOS, PrefixOracle, make_texts, make_tokenizer, random_model

from moe_study.config.schema import EvalConfig
from moe_study.data.tasks import CHOICES, choice_items, cloze_items, encode_items, jsonl
from moe_study.evaluation.scoring import score_continuations
from moe_study.evaluation.stats import wilson
from moe_study.evaluation.tasks import evaluate_tasks

TEXTS = make_texts()
CFG = EvalConfig(task_items=60, choice_words=3, min_context_words=4)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    for name, items in (("cloze", cloze_items(TEXTS, CFG, tok, 24)), ("choice", choice_items(TEXTS, CFG, tok, 24))):
        encode_items(items, tok)
        (d / f"{name}.jsonl").write_bytes(jsonl(items))
    return d


def test_items_are_seeded_and_deterministic(tok) -> None:
    for build in (cloze_items, choice_items):
        a, b = build(TEXTS, CFG, tok, 24), build(TEXTS, CFG, tok, 24)
        assert a == b and len(a) == CFG.task_items
        assert len({it["id"] for it in a}) == len(a)
        other = build(TEXTS, CFG.model_copy(update={"task_seed": 1}), tok, 24)
        assert [it["id"] for it in other] != [it["id"] for it in a]
    many = cloze_items(TEXTS, CFG.model_copy(update={"task_items": 10**6}), tok, 24)
    assert len(many) < 10**6 and len(many) > CFG.task_items  # every candidate, once


def test_cloze_items_are_sentence_final_words(tok) -> None:
    texts = dict(TEXTS)
    for it in cloze_items(TEXTS, CFG, tok, 24):
        text = texts[it["doc"]]
        assert text.startswith(it["context"] + it["target"])
        assert re.match(r"^ [A-Za-z][A-Za-z'-]*[A-Za-z]$", it["target"])
        assert text[len(it["context"] + it["target"])] in ".!?"
        assert len(it["context"].split()) >= CFG.min_context_words


def test_choice_items_have_the_true_continuation_and_three_foreign_spans(tok) -> None:
    texts = dict(TEXTS)
    items = choice_items(TEXTS, CFG, tok, 24)
    assert {it["label"] for it in items} == set(range(CHOICES))
    for it in items:
        text = texts[it["doc"]]
        assert text.startswith(it["context"]) and len(it["endings"]) == len(set(it["endings"])) == CHOICES
        true = it["endings"][it["label"]]
        assert text[len(it["context"]):].split()[:CFG.choice_words] == true.split()
        for j, e in enumerate(it["endings"]):
            assert e.startswith(" ") and len(e.split()) == CFG.choice_words
            assert len(tok.encode(e, add_special_tokens=False).ids) <= 24
            if j != it["label"]:
                assert any(e.strip() in " ".join(t.split()) for d, t in TEXTS if d != it["doc"])


def test_token_limit_drops_long_continuations(tok) -> None:
    assert choice_items(TEXTS, CFG, tok, 1) == []  # no 3-word ending fits in one token
    short = cloze_items(TEXTS, CFG.model_copy(update={"task_items": 10**6}), tok, 1)
    assert short and all(len(tok.encode(it["target"], add_special_tokens=False).ids) == 1 for it in short)


def test_batched_scoring_matches_one_request_at_a_time() -> None:
    model = random_model(50, seq_len=16)
    rng = np.random.default_rng(0)
    reqs = [(rng.integers(1, 50, size=int(rng.integers(0, 30))).tolist(), rng.integers(1, 50, size=int(n)).tolist())
            for n in rng.integers(1, 8, size=23)]
    lp, greedy = score_continuations(model, reqs, EOS, batch_size=5)
    for i, (ctx, cont) in enumerate(reqs):
        seq = ([EOS, *ctx, *cont])[-17:]  # a long context loses its oldest tokens
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].double(), dim=-1)
        rows = logp[len(seq) - 1 - len(cont):]
        want = sum(float(rows[j, t]) for j, t in enumerate(cont))
        assert lp[i] == pytest.approx(want, abs=1e-4)
        assert greedy[i] == all(int(rows[j].argmax()) == t for j, t in enumerate(cont))


def test_an_oracle_gets_every_item_right(tasks_dir: Path, tok) -> None:
    docs = [tok.encode(t, add_special_tokens=False).ids for _, t in TEXTS]
    res = evaluate_tasks(PrefixOracle(docs, tok.get_vocab_size()), tasks_dir, EOS, batch_size=16)
    assert res["cloze"]["items"] == res["choice"]["items"] == CFG.task_items
    assert res["cloze"]["acc"] == 1.0 and res["choice"]["acc"] == 1.0
    assert res["choice"]["acc_ci"][0] > 0.9 and res["choice"]["chance"] == 0.25


def test_accuracy_matches_a_direct_computation(tasks_dir: Path, tok) -> None:
    import json

    model = random_model(tok.get_vocab_size(), seq_len=256)  # no truncation: checked above
    res = evaluate_tasks(model, tasks_dir, EOS, batch_size=7)
    choice = [json.loads(x) for x in (tasks_dir / "choice.jsonl").read_text().splitlines()]
    correct = 0
    for it in choice:
        per_byte = []
        for ids, e in zip(it["ending_ids"], it["endings"], strict=True):
            seq = [EOS, *it["context_ids"], *ids]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].double(), dim=-1)
            lp = sum(float(logp[len(seq) - 1 - len(ids) + j, t]) for j, t in enumerate(ids))
            per_byte.append(lp / len(e.encode()))
        correct += int(np.argmax(per_byte) == it["label"])
    assert res["choice"]["correct"] == correct and res["choice"]["acc"] == correct / len(choice)
    assert res["choice"]["acc_ci"] == pytest.approx(wilson(correct, len(choice)))


def wilson_by_hand(correct: int, n: int, z: float) -> list[float]:
    """The Wilson score interval written out (what stats.py computed before it used scipy)."""
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def test_wilson_is_the_hand_written_formula() -> None:
    """scipy's interval is the formula to 1e-12 with the exact quantile; the old z = 1.959964 moves it < 5e-9."""
    from scipy.special import ndtri

    for n in (1, 2, 5, 10, 64, 100, 999, 3000, 10**5):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            got = wilson(k, n)
            assert got == pytest.approx(wilson_by_hand(k, n, float(ndtri(0.975))), abs=1e-12), (k, n)
            assert got == pytest.approx(wilson_by_hand(k, n, 1.959964), abs=5e-9), (k, n)


def test_wilson_interval() -> None:
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) is None
    lo, hi = wilson(300, 1000)
    assert lo < 0.3 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 1000), rel=0.02)
