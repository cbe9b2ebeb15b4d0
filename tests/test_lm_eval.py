"""The lm-evaluation-harness adapter (moe_study/evaluation/lm_eval_adapter.py) on a local YAML task over local JSONL.

Offline: the harness reads the task files through `datasets`' json loader, with the hub disabled.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from task_helpers import EOS, PrefixOracle, Uniform, make_texts, make_tokenizer, save_random_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))

from moe_study.config.schema import EvalConfig  # noqa: E402
from moe_study.data.tasks import choice_items, cloze_items, encode_items, jsonl  # noqa: E402
from moe_study.evaluation.lm_eval_adapter import ProjectLM, run_harness, write_study_tasks  # noqa: E402
from moe_study.evaluation.tasks import evaluate_tasks  # noqa: E402

TEXTS = make_texts(30, seed=4)
CFG = EvalConfig(task_items=40, choice_words=3, min_context_words=4)


def req(*args: object) -> SimpleNamespace:
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProjectLM, object, Path]:
    tmp = tmp_path_factory.mktemp("lmeval")
    tok = make_tokenizer(TEXTS)
    lm = ProjectLM(save_random_model(tmp / "model", tok.get_vocab_size(), seq_len=256), tokenizer=tok,
                   batch_size=8, device="cpu")
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, items in (("cloze", cloze_items(TEXTS, CFG, tok, 24)), ("choice", choice_items(TEXTS, CFG, tok, 24))):
        encode_items(items, tok)
        (tasks / f"{name}.jsonl").write_bytes(jsonl(items))
    return lm, tok, tasks


def direct_logprob(model: torch.nn.Module, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    return sum(float(logp[len(ids) - 1 - n_cont + j, t]) for j, t in enumerate(ids[len(ids) - n_cont:]))


def test_loglikelihood_is_the_models_log_probability(setup) -> None:
    lm, tok, _ = setup
    cases = [("The cat sat over the", " garden"), ("The cat sat over the ", "garden."), ("", "Bright morning")]
    got = lm.loglikelihood([req(c, x) for c, x in cases])
    for (ctx, cont), (lp, greedy) in zip(cases, got, strict=True):
        whole = tok.encode((ctx + cont), add_special_tokens=False).ids
        n_ctx = len(tok.encode(ctx.rstrip(), add_special_tokens=False).ids) if ctx.strip() else 0
        assert lp == pytest.approx(direct_logprob(lm.model, [EOS, *whole], len(whole) - n_ctx), abs=1e-4)
        assert lp < 0 and isinstance(greedy, bool)


def test_loglikelihood_rolling_scores_every_token_once(setup) -> None:
    lm, tok, _ = setup
    short = TEXTS[0][1][:60]
    ids = tok.encode(short, add_special_tokens=False).ids
    assert lm.loglikelihood_rolling([req(short)])[0] == pytest.approx(direct_logprob(lm.model, [EOS, *ids], len(ids)),
                                                                      abs=1e-4)
    long = " ".join(t for _, t in TEXTS[:6])
    n = len(tok.encode(long, add_special_tokens=False).ids)
    real, lm.model = lm.model, Uniform(tok.get_vocab_size(), seq_len=16)  # windows of 16 over > 16 tokens
    try:
        lm.seq_len = 16
        assert n > 40
        assert lm.loglikelihood_rolling([req(long)])[0] == pytest.approx(-n * math.log(tok.get_vocab_size()))
    finally:
        lm.model, lm.seq_len = real, 256


def test_generate_until_stops_at_the_stop_string(setup) -> None:
    lm, tok, _ = setup
    docs = [tok.encode(t, add_special_tokens=False).ids for _, t in TEXTS]
    real, lm.model = lm.model, PrefixOracle(docs, tok.get_vocab_size(), seq_len=256)
    try:
        text = TEXTS[3][1]
        cut = text.index(" ", 20)
        want = text[cut:].split(".")[0]
        assert lm.generate_until([req(text[:cut], {"until": ["."], "max_gen_toks": 200})]) == [want]
        capped = lm.generate_until([req(text[:cut], {"until": ["."], "max_gen_toks": 2})])[0]
        assert len(tok.encode(capped, add_special_tokens=False).ids) <= 2 and want.startswith(capped)
    finally:
        lm.model = real


def test_harness_on_local_task_files_agrees_with_evaluate(setup, tmp_path: Path) -> None:
    """The harness (YAML over local JSONL) and the project's own scoring give the same accuracies."""
    lm, tok, tasks = setup
    write_study_tasks(tasks, tmp_path)
    res = run_harness(lm, ["moe_eq_cloze", "moe_eq_choice"], tmp_path)
    ours = evaluate_tasks(lm.model, tasks, EOS, batch_size=8)
    assert res["moe_eq_cloze"]["acc,none"] == pytest.approx(ours["cloze"]["acc"])
    assert res["moe_eq_choice"]["acc_norm,none"] == pytest.approx(ours["choice"]["acc"])  # ASCII: chars = bytes
    assert res["moe_eq_choice"]["sample_len"] == CFG.task_items
    docs = [tok.encode(t, add_special_tokens=False).ids for _, t in TEXTS]
    real, lm.model = lm.model, PrefixOracle(docs, tok.get_vocab_size(), seq_len=256)
    try:
        res = run_harness(lm, ["moe_eq_cloze", "moe_eq_choice"], tmp_path)
    finally:
        lm.model = real
    assert res["moe_eq_cloze"]["acc,none"] == 1.0 and res["moe_eq_choice"]["acc_norm,none"] == 1.0
