"""train@run and evaluate@run on a tiny synthetic work/ tree (real token shards, split and replay).

The documents are counting sequences (each token is the previous plus one), so a model that
learns anything drives the loss far below ln(vocab); the evaluation is checked against a direct
per-token computation of the same definition (nats / ln 2 / bytes).
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe_study.accounting import plan_run
from moe_study.config.schema import Params, parse_params
from moe_study.data.artefacts import ShardWriter, token_schema
from moe_study.data.heldout import HeldoutDoc, load_heldout
from moe_study.evaluation.heldout_loss import bootstrap, run_evaluate, select_docs, windows
from moe_study.io import read_json, write_json
from moe_study.model.lm import build_model, load_model
from moe_study.train.engine import lr_at, make_engine, param_groups
from moe_study.train.loop import Trainer, TrainError, run_train, train

VOCAB, EOS, N_DOCS = 64, 0, 80

PARAMS: dict[str, Any] = {
    "study": "t",
    "seed": 5,
    "corpus": {"sources": [{"kind": "synthetic", "docs": 10}]},
    # params_tol 2%: 4 experts of d=16 move N in steps of 192 = 6% of 3000 per unit of expert width
    "budget": {"params": 3000, "compute": 6 * 3000 * 64 * 60, "unique_tokens": 1500, "params_tol": 0.02,
               "compute_convention": "6n"},  # C = 6 N T: 60 steps of 64 tokens
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 16, "multiple_of": 2},
    "runs": {
        "dense": {"kind": "dense"},
        "moe": {"kind": "moe", "experts": 4, "top_k": 1},
    },
    "train": {"batch_size": 4, "lr": 1e-2, "warmup_steps": 5, "log_every": 20, "threads": 1},
    "eval": {"batch_size": 8, "bootstrap": 200, "task_items": 0},
}


def doc_tokens(d: int) -> np.ndarray:
    n = 10 + (d * 7) % 41  # 10..50 tokens: some docs span several 16-token windows
    return ((d + np.arange(n)) % (VOCAB - 1) + 1).astype(np.uint16)  # counting, never EOS


def heldout(d: int) -> bool:
    return d % 8 == 3


# the columns of steps.parquet that training determines (tokens_per_s and mfu are timings)
CURVE_COLUMNS = ("step", "tokens", "loss", "lr", "grad_norm", "aux_loss", "z_loss", "load_max_over_mean",
                 "load_entropy", "layer_expert_fraction")


def step_curve(run_dir: Path) -> dict[str, list[Any]]:
    """A run's training curve from its steps.parquet, without the timing columns (exact floats)."""
    return pq.read_table(run_dir / "steps.parquet", columns=list(CURVE_COLUMNS)).to_pydict()


def make_work(root: Path, p: Params, runs: list[str]) -> Path:
    """work/ with token shards, split, and each run's plan.json + replay.json (the real replay stage)."""
    from moe_study.data.replay import build_replay

    work = root / "work"
    w = ShardWriter(work / "tokens", "tokens", token_schema("uint16"))
    for docs in (range(0, 50), range(50, N_DOCS)):
        toks = [doc_tokens(d) for d in docs]
        w.write(pa.table({
            "doc": pa.array(list(docs), pa.int64()),
            "id": [f"d{d}" for d in docs],
            "source": ["syn"] * len(toks),
            "n_bytes": pa.array([3 * len(t) + 1 for t in toks], pa.int64()),
            "tokens": pa.array([t.tolist() for t in toks], pa.list_(pa.uint16())),
        }))
    w.finish(eos_id=EOS, dtype="uint16", vocab_size=VOCAB, docs=N_DOCS)
    (work / "split").mkdir(parents=True)
    pq.write_table(pa.table({"doc": pa.array(range(N_DOCS), pa.int64()),
                             "split": ["heldout" if heldout(d) else "train" for d in range(N_DOCS)]}),
                   work / "split" / "split.parquet")
    write_json(work / "split" / "manifest.json", {"train_tokens": 10**6})
    for run in runs:
        plan = plan_run(p, run).to_dict() | {"data_seed": p.seed}
        plan_path = work / "runs" / run / "plan.json"
        write_json(plan_path, plan)
        manifest = build_replay(run, plan_path, work / "tokens", work / "split", work / "store" / "replay")
        write_json(work / "runs" / run / "replay.json", manifest)
    return work


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(PARAMS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, params: Params) -> Path:
    """Both runs trained once; tests read the outputs (and must not modify them)."""
    work = make_work(tmp_path_factory.mktemp("trained"), params, ["dense", "moe"])
    for run in ("dense", "moe"):
        run_train(params, run, work=work)
    return work


# ------------------------------------------------------------------------------------- schedule
def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(0, 1, 1.0, 0, 0.0) == pytest.approx(1.0)


def test_weight_decay_on_matrices_only() -> None:
    m = build_model(plan_run(parse_params(PARAMS), "moe").arch.to_dict(), VOCAB)
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# -------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("run", ["dense", "moe"])
def test_train_learns_and_meets_the_budget(trained: Path, run: str) -> None:
    rdir = trained / "runs" / run
    res, plan = read_json(rdir / "train.json"), read_json(rdir / "plan.json")
    assert res["tokens_seen"] == plan["tokens"] == res["steps"] * plan["tokens_per_step"]
    assert res["steps"] == plan["steps"]
    assert (res["nonvocab_params"], res["nonvocab_active"]) == (plan["nonvocab_params"], plan["nonvocab_active"])
    audit = res["audit"]  # plan vs module params, loader tokens and flop-counter FLOPs (moe_study/train/audit.py)
    assert audit["ok"] and audit["tokens"]["actual"] == plan["tokens"], audit
    assert abs(audit["flops_per_token"]["rel_dev"]) < 0.01
    assert res["first_train_loss"] > math.log(VOCAB) - 0.3
    assert res["final_train_loss"] < 0.5 * math.log(VOCAB), res["final_train_loss"]
    curve = step_curve(rdir)
    assert len(curve["step"]) == plan["steps"] and curve["tokens"][-1] == plan["tokens"]
    assert res["provenance"]["inputs"]["replay"] and res["provenance"]["code_sha256"]
    cfg = read_json(rdir / "model" / "config.json")
    assert cfg["arch"] == plan["arch"] and cfg["vocab_size"] == VOCAB and cfg["eos_id"] == EOS
    if run == "moe":
        load = res["expert_load"]
        assert len(load["fraction_per_expert"][0]) == plan["arch"]["experts"]
        assert sum(load["fraction_per_expert"][0]) == pytest.approx(1.0, abs=1e-5)
        assert res["expert_backends"]["layer0"] == ("reference" if res["device"] == "cpu" else "torch_grouped")
        assert 0.5 < res["final_aux_loss"] < plan["arch"]["experts"]
    else:
        assert res["expert_load"] is None


def test_train_is_byte_deterministic(trained: Path, params: Params, tmp_path: Path) -> None:
    work = make_work(tmp_path, params, ["moe"])
    run_train(params, "moe", work=work)
    model = "model/model.safetensors"
    assert (work / "runs/moe" / model).read_bytes() == (trained / "runs/moe" / model).read_bytes()
    assert step_curve(work / "runs/moe") == step_curve(trained / "runs/moe")
    # config.json differs only in the replay.json hash, which records this tmp dir's store path
    a, b = read_json(work / "runs/moe/model/config.json"), read_json(trained / "runs/moe/model/config.json")
    a["provenance"]["inputs"].pop("replay")
    b["provenance"]["inputs"].pop("replay")
    assert a == b


def test_other_seed_gives_other_weights(trained: Path, params: Params, tmp_path: Path) -> None:
    raw = copy.deepcopy(PARAMS)
    raw["runs"]["dense"]["seed"] = 1
    p = parse_params(raw)
    work = make_work(tmp_path, p, ["dense"])
    res = run_train(p, "dense", work=work)
    assert res["seed"] == 1
    new = (work / "runs/dense/model/model.safetensors").read_bytes()
    assert new != (trained / "runs/dense/model/model.safetensors").read_bytes()


def test_resume_from_state_dict_is_exact(params: Params, tmp_path: Path) -> None:
    """Stop half way, restore model/optimizer/loader state into a fresh trainer: same weights."""
    from moe_study.data.shards import ReplayLoader

    work = make_work(tmp_path, params, ["dense"])
    plan = read_json(work / "runs/dense/plan.json")
    steps, arch = 12, plan["arch"]

    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = build_model(arch, VOCAB)
        engine = make_engine(model, params.train, 1e-2, torch.device("cpu"), 4)
        loader = ReplayLoader(work / "runs/dense/replay.json", 4)
        return Trainer(engine=engine, loader=loader, steps=steps, batch_size=4, seq_len=16, vocab_size=VOCAB,
                       lr=1e-2, cfg=params.train)

    straight = trainer()
    straight.run()
    first = trainer()
    first.steps = 5
    first.run()
    state = copy.deepcopy(first.state_dict())
    resumed = trainer()
    resumed.load_state_dict(state)
    resumed.run()
    assert resumed.step == steps and resumed.loader.tokens_served == straight.loader.tokens_served
    for (n, a), (_, b) in zip(straight.engine.module.state_dict().items(),
                              resumed.engine.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert [h.loss for h in resumed.history] == [h.loss for h in straight.history]


class ListLoader:
    """An in-memory loader with ReplayLoader's interface."""

    def __init__(self, batches: list[torch.Tensor], seq_len: int) -> None:
        self.batches, self.seq_len, self.i = batches, seq_len, 0

    def __iter__(self) -> ListLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.i >= len(self.batches):
            raise StopIteration
        self.i += 1
        return self.batches[self.i - 1]

    @property
    def tokens_served(self) -> int:
        return sum(b.shape[0] * self.seq_len for b in self.batches[:self.i])

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


def counting_batches(n: int, batch: int = 4, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, VOCAB, (n, batch, 1), generator=g)
    return list((starts + torch.arange(seq + 1)) % (VOCAB - 1) + 1)


def test_short_stream_and_bad_batches_are_clear_errors(params: Params) -> None:
    arch = plan_run(params, "dense").arch.to_dict()
    with pytest.raises(TrainError, match="ended after 3 of 5 steps"):
        train(build_model(arch, VOCAB), ListLoader(counting_batches(3), 16), params.train, steps=5, batch_size=4,
              lr=1e-2, seed=0)
    bad = counting_batches(2)
    bad[1] = bad[1] + VOCAB
    with pytest.raises(TrainError, match="outside the vocabulary"):
        train(build_model(arch, VOCAB), ListLoader(bad, 16), params.train, steps=2, batch_size=4, lr=1e-2, seed=0)
    with pytest.raises(TrainError, match="shape"):
        train(build_model(arch, VOCAB), ListLoader([b[:, :10] for b in counting_batches(2)], 16), params.train,
              steps=2, batch_size=4, lr=1e-2, seed=0)


def test_stale_plan_is_refused(trained: Path, params: Params, tmp_path: Path) -> None:
    raw = copy.deepcopy(PARAMS)
    raw["train"]["batch_size"] = 8
    work = tmp_path / "work"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("model", "train*"))
    with pytest.raises(TrainError, match="batch_size"):
        run_train(parse_params(raw), "dense", work=work)


def test_deepspeed_engine_follows_the_torch_engine(params: Params) -> None:
    """DeepSpeed ZeRO-1 on CPU (fp32, torch AdamW): the same loss curve as the plain loop."""
    pytest.importorskip("deepspeed")
    arch = plan_run(params, "moe").arch.to_dict()
    curves = {}
    for engine in ("torch", "deepspeed"):
        cfg = params.train.model_copy(update={"engine": engine, "device": "cpu"})
        torch.manual_seed(0)
        model = build_model(arch, VOCAB)
        trainer, metrics = train(model, ListLoader(counting_batches(8), 16), cfg, steps=8, batch_size=4,
                                 lr=1e-2, seed=0)
        assert metrics["engine"] == engine
        curves[engine] = [h.loss for h in trainer.history]
    assert curves["deepspeed"][-1] < curves["deepspeed"][0] - 0.1
    np.testing.assert_allclose(curves["deepspeed"], curves["torch"], rtol=1e-4)


# ------------------------------------------------------------------------------------ evaluation
def hand_nats(model: torch.nn.Module, tokens: np.ndarray, seq_len: int) -> tuple[float, int]:
    """Sum of -log p over EOS + doc + EOS, predicting position i+1 from the window it falls in."""
    seq = [EOS, *tokens.tolist(), EOS]
    total, n = 0.0, 0
    for start in range(0, len(seq) - 1, seq_len):
        inp = seq[start:start + seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), dim=-1)
        for i in range(len(inp)):
            if start + i + 1 < len(seq):
                total -= float(logp[i, seq[start + i + 1]])
                n += 1
    return total, n


def test_evaluate_matches_hand_computation(trained: Path, params: Params, tmp_path: Path) -> None:
    res = run_evaluate(params, "moe", work=trained, out_dir=tmp_path)
    assert read_json(tmp_path / "moe.json")["bpb"] == res["bpb"]
    model, _ = load_model(trained / "runs/moe/model")
    model.eval()
    docs = [d for d in range(N_DOCS) if heldout(d)]
    nats, n, nbytes = 0.0, 0, 0
    for d in docs:
        a, b = hand_nats(model, doc_tokens(d), 16)
        # the doc's UTF-8 bytes (3 len + 1 in make_work) and one byte for the closing EOS, whose
        # prediction is in the nats (issue 14: both count it)
        nats, n, nbytes = nats + a, n + b, nbytes + (3 * len(doc_tokens(d)) + 1) + 1
    assert res["docs"] == len(docs) and res["tokens"] == n == sum(len(doc_tokens(d)) + 1 for d in docs)
    assert res["bytes"] == nbytes
    assert res["loss"] == pytest.approx(nats / n, rel=1e-5)
    assert res["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nats / n), rel=1e-5)
    lo, hi = res["bpb_ci"]
    assert lo < res["bpb"] < hi and res["loss_ci"][0] < res["loss"] < res["loss_ci"][1]
    per_doc = pq.read_table(tmp_path / "moe.docs.parquet").to_pydict()
    assert per_doc["doc"] == docs and set(per_doc["split"]) == {"heldout"} and res["validation"] is None
    assert sum(per_doc["nats"]) == pytest.approx(nats, rel=1e-5) and sum(per_doc["bytes"]) == nbytes
    plan = read_json(trained / "runs/moe/plan.json")
    assert res["plan"]["arch"] == plan["arch"] and res["plan"]["epochs"] == plan["epochs"]
    assert res["kind"] == "moe" and res["provenance"]["inputs"]["model"]
    # a trained model beats the uniform distribution by far on counting sequences
    assert res["loss"] < 0.5 * math.log(VOCAB)


def test_evaluate_is_deterministic(trained: Path, params: Params, tmp_path: Path) -> None:
    run_evaluate(params, "dense", work=trained, out_dir=tmp_path / "a")
    run_evaluate(params, "dense", work=trained, out_dir=tmp_path / "b")
    assert (tmp_path / "a/dense.json").read_bytes() == (tmp_path / "b/dense.json").read_bytes()


def test_evaluate_scores_the_validation_split_apart(trained: Path, params: Params, tmp_path: Path) -> None:
    """Issue 14: validation docs (lr choice) are scored under `validation`, never mixed into the test figures."""
    work = tmp_path / "work"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("store", "ckpt"))
    split = {d: "heldout" if heldout(d) else "validation" if d % 8 == 5 else "train" for d in range(N_DOCS)}
    pq.write_table(pa.table({"doc": pa.array(range(N_DOCS), pa.int64()), "split": [split[d] for d in range(N_DOCS)]}),
                   work / "split" / "split.parquet")
    res = run_evaluate(params, "dense", work=work, out_dir=tmp_path / "eval")
    base = run_evaluate(params, "dense", work=trained, out_dir=tmp_path / "base")
    assert res["loss"] == base["loss"] and res["docs"] == base["docs"]  # held-out unchanged
    val = [d for d in range(N_DOCS) if split[d] == "validation"]
    assert res["validation"]["docs"] == len(val) and res["validation"]["loss"] > 0
    t = pq.read_table(tmp_path / "eval" / "dense.docs.parquet").to_pydict()
    assert [d for d, s in zip(t["doc"], t["split"], strict=True) if s == "validation"] == val
    vn = sum(x for x, s in zip(t["nats"], t["split"], strict=True) if s == "validation")
    assert res["validation"]["loss"] == pytest.approx(vn / res["validation"]["tokens"])


def test_seeds_vary_the_data_order_seed_0_keeps_it(params: Params, tmp_path: Path) -> None:
    """Issue 14: seed > 0 reads the same unique set in another epoch order; seed 0 keeps today's order."""
    from moe_study.data.replay import build_replay
    from stages.plan import order_seed

    raw = copy.deepcopy(PARAMS)
    raw["runs"] = {"a": {"kind": "dense", "seed": 0}, "b": {"kind": "dense", "seed": 3}}
    p = parse_params(raw)
    assert (order_seed(p, "a"), order_seed(p, "b")) == (0, 3)
    raw["train"]["vary_data_order"] = False
    assert order_seed(parse_params(raw), "b") == 0
    work = make_work(tmp_path, params, ["dense"])
    plan = read_json(work / "runs/dense/plan.json")
    out = {}
    for seed in (0, 3):
        path = work / "runs" / f"o{seed}" / "plan.json"
        write_json(path, plan | {"order_seed": seed})
        out[seed] = build_replay(f"o{seed}", path, work / "tokens", work / "split", work / "store" / "replay")
    old = read_json(work / "runs/dense/replay.json")  # a plan without order_seed: the order of before
    assert out[0]["epochs"] == old["epochs"] and out[0]["store"] == old["store"]
    assert out[0]["epochs"][0]["seed"] == [p.seed, 0] and out[3]["epochs"][0]["seed"] == [p.seed, 0, 3]
    assert out[3]["unique"]["sha256"] == out[0]["unique"]["sha256"]  # the same unique data U
    assert out[3]["epochs"][0]["sha256"] != out[0]["epochs"][0]["sha256"]


def test_windows_cover_every_prediction_once() -> None:
    toks = np.arange(1, 40)
    ws = windows(toks, EOS, 16)
    assert [len(t) for _, t in ws] == [16, 16, 8]
    targets = np.concatenate([t for _, t in ws])
    assert targets.tolist() == [*toks.tolist(), EOS]
    assert ws[0][0][0] == EOS and ws[1][0][0] == toks[15]


def test_max_tokens_takes_whole_docs_under_the_cap() -> None:
    docs = [HeldoutDoc(d, 10, np.ones(5 + d, dtype=np.int64)) for d in range(20)]
    docs.append(HeldoutDoc(99, 0, np.zeros(0, dtype=np.int64)))
    chosen, empty = select_docs(docs, 60, seed=3)
    assert empty == 1
    cost = sum(len(d.tokens) + 1 for d in chosen)
    assert 0 < cost <= 60 and [d.doc for d in chosen] == sorted(d.doc for d in chosen)
    assert [d.doc for d in select_docs(docs, 60, seed=3)[0]] == [d.doc for d in chosen]
    all_docs, _ = select_docs(docs, None, seed=3)
    assert len(all_docs) == 20


def test_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    count = rng.integers(10, 50, size=200)
    nats = count * 2.0 + rng.normal(0, 3, size=200)
    nbytes = count * 4
    ci = bootstrap(nats, count, nbytes, 500, seed=1)
    assert ci["loss"][0] < nats.sum() / count.sum() < ci["loss"][1]
    assert ci["loss"][1] - ci["loss"][0] < 0.2
    assert ci == bootstrap(nats, count, nbytes, 500, seed=1)
    assert bootstrap(nats, count, nbytes, 0, seed=1) is None


def test_load_heldout_reads_only_heldout_docs(trained: Path) -> None:
    docs = load_heldout(trained / "tokens", trained / "split" / "split.parquet")
    assert [d.doc for d in docs] == [d for d in range(N_DOCS) if heldout(d)]
    assert all(np.array_equal(d.tokens, doc_tokens(d.doc)) for d in docs)


# ----------------------------------------------------------------------------------- zero-shot tasks
def counting_tasks(directory: Path, rng: np.random.Generator) -> None:
    """Cloze: the last token of a held-out doc; choice: its next 3 tokens vs 3 spans of other docs."""
    import json

    docs = [d for d in range(N_DOCS) if heldout(d)]
    cloze, choice = [], []
    for d in docs:
        t = doc_tokens(d).tolist()
        cloze.append({"id": f"c{d}", "doc": d, "context_ids": t[:-1], "target_ids": t[-1:]})
        endings = [t[6:9]]
        while len(endings) < 4:
            o = doc_tokens(int(rng.choice([x for x in docs if x != d]))).tolist()
            j = int(rng.integers(0, len(o) - 3))
            if o[j:j + 3] not in endings:
                endings.append(o[j:j + 3])
        label = int(rng.integers(4))
        endings[0], endings[label] = endings[label], endings[0]
        choice.append({"id": f"x{d}", "doc": d, "context_ids": t[:6], "ending_ids": endings, "label": label,
                       "ending_bytes": [9] * 4})
    directory.mkdir(parents=True)
    for name, items in (("cloze", cloze), ("choice", choice)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    write_json(directory / "manifest.json", {"tasks": {"cloze": len(cloze), "choice": len(choice)}})


def test_evaluate_scores_the_zero_shot_tasks(trained: Path, tmp_path: Path) -> None:
    """A model that learned to count predicts the next token of a counting doc and picks its continuation."""
    from moe_study.evaluation.heldout_loss import EvalError

    work = tmp_path / "work"
    work.mkdir()
    for sub in ("tokens", "split", "runs"):
        (work / sub).symlink_to(trained / sub)
    raw = copy.deepcopy(PARAMS)
    raw["eval"]["task_items"] = 100
    p = parse_params(raw)
    with pytest.raises(EvalError, match="tasks stage"):
        run_evaluate(p, "dense", work=work, out_dir=tmp_path / "eval")
    counting_tasks(work / "tasks", np.random.default_rng(0))
    res = run_evaluate(p, "dense", work=work, out_dir=tmp_path / "eval")
    n = sum(heldout(d) for d in range(N_DOCS))
    assert res["tasks"]["cloze"]["items"] == res["tasks"]["choice"]["items"] == n
    assert res["tasks"]["cloze"]["acc"] > 0.8 and res["tasks"]["choice"]["acc"] > 0.8, res["tasks"]
    assert res["provenance"]["inputs"]["tasks"]


# --------------------------------------------------------------------------- logs, schedules, config
@pytest.mark.parametrize("run", ["dense", "moe"])
def test_steps_parquet_and_dvclive(trained: Path, run: str) -> None:
    import json

    rdir = trained / "runs" / run
    plan, res = read_json(rdir / "plan.json"), read_json(rdir / "train.json")
    t = pq.read_table(rdir / "steps.parquet").to_pydict()
    assert set(t) == {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "aux_loss", "z_loss",
                      "load_max_over_mean", "load_entropy", "layer_load_max_over_mean", "layer_load_entropy",
                      "layer_expert_fraction"}
    assert t["step"] == list(range(1, plan["steps"] + 1)) and t["tokens"][-1] == plan["tokens"]
    assert all(v > 0 for v in t["tokens_per_s"]) and all(g > 0 for g in t["grad_norm"])
    assert all(m is None for m in t["mfu"]) and res["mfu"] is None and "CPU" in res["peak_flops_source"]
    assert res["engine"] == "torch" and res["processes"] == 1 and res["flops_per_token"] == plan["flops_per_token"]
    moe_cols = ("aux_loss", "z_loss", "load_max_over_mean", "load_entropy")
    if run == "moe":
        assert all(v is not None for c in moe_cols for v in t[c])
        assert all(1.0 <= v <= plan["arch"]["experts"] for v in t["load_max_over_mean"])
        assert all(0.0 < v <= 1.0 + 1e-9 for v in t["load_entropy"])
        assert len(res["expert_load"]["entropy"]) == plan["arch"]["n_layers"]
        fractions = t["layer_expert_fraction"]
        assert all(len(f) == plan["arch"]["n_layers"] and len(f[0]) == plan["arch"]["experts"] for f in fractions)
        assert all(sum(f[0]) == pytest.approx(1.0) for f in fractions)
        assert [max(r) for r in t["layer_load_max_over_mean"]] == pytest.approx(t["load_max_over_mean"])
        mean = np.mean([f[0] for f in fractions], axis=0)  # the run's mean load, as train.json reports it
        np.testing.assert_allclose(mean, res["expert_load"]["fraction_per_expert"][0], atol=1e-6)
        assert (rdir / "dvclive/plots/metrics/train/layer0/load_entropy.tsv").exists()
    else:
        assert all(v is None for c in moe_cols for v in t[c]) and all(v is None for v in t["layer_expert_fraction"])
    live = json.loads((rdir / "dvclive/metrics.json").read_text())
    assert live["step"] == plan["steps"] and live["train"]["loss"] == t["loss"][-1]
    assert live["final_train_loss"] == res["final_train_loss"]
    tsv = (rdir / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["step", "loss"] and len(tsv) == plan["steps"] + 1
    assert ((rdir / "dvclive/plots/metrics/train/aux_loss.tsv").exists()) == (run == "moe")


def test_wsd_schedule_and_warmup_fraction() -> None:
    from moe_study.train.engine import schedule_lr

    lrs = [lr_at(s, 100, 1.0, 10, 0.1, "wsd", 0.2) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and all(v == 1.0 for v in lrs[10:80])
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)
    cfg = parse_params(PARAMS).train.model_copy(update={"warmup_fraction": 0.25})
    assert schedule_lr(cfg, 24, 100, 2.0) == pytest.approx(2.0) and schedule_lr(cfg, 0, 100, 2.0) == pytest.approx(0.08)


def test_deepspeed_config_follows_params() -> None:
    from moe_study.train.engine import deepspeed_config

    raw = copy.deepcopy(PARAMS)
    raw["train"] |= {"batch_size": 32, "micro_batch_size": 4, "gpus": 2, "zero_stage": 2, "dtype": "bf16",
                     "grad_clip": 0.5, "weight_decay": 0.05}
    cfg = parse_params(raw).train
    ds = deepspeed_config(cfg, 1e-3, "cuda", 2)
    sizes = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert sizes == (32, 4, 4)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["fused"] and ds["zero_optimization"]["overlap_comm"]
    assert ds["bf16"]["check_grad_overflow"] is False  # the loop's own norm check guards bf16 steps
    one = deepspeed_config(cfg.model_copy(update={"gpus": 1, "micro_batch_size": None}), 1e-3, "cuda", 1)
    assert one["zero_optimization"]["overlap_comm"] is False  # nothing to overlap on one process
    cpu = deepspeed_config(cfg.model_copy(update={"dtype": "fp32"}), 1e-3, "cpu", 2)
    assert "fused" not in cpu["optimizer"]["params"] and cpu["bf16"] == {"enabled": False}
    bad = copy.deepcopy(raw)
    bad["train"]["micro_batch_size"] = 3
    with pytest.raises(Exception, match="micro_batch_size"):
        parse_params(bad)


def test_deepspeed_invalid_norm_sentinel_is_nan() -> None:
    """DeepSpeed reports a non-finite bf16 norm as -1 when it does not check overflow: the loop must see NaN."""
    from moe_study.train.engine import ds_grad_norm

    assert ds_grad_norm(torch.tensor(2.5)) == 2.5 and ds_grad_norm(0.0) == 0.0
    assert all(math.isnan(ds_grad_norm(v)) for v in (-1.0, None, float("nan"), torch.tensor(-1.0)))


def test_gradient_accumulation_matches_the_full_batch(params: Params) -> None:
    """Micro-batches of 1 accumulated to a step of 4 follow the one-shot step (fp32, up to rounding)."""
    arch = plan_run(params, "moe").arch.to_dict()
    curves = {}
    for micro in (None, 1):
        cfg = params.train.model_copy(update={"micro_batch_size": micro, "aux_loss_coef": 0.0})
        torch.manual_seed(0)
        trainer, metrics = train(build_model(arch, VOCAB), ListLoader(counting_batches(6), 16), cfg, steps=6,
                                 batch_size=4, lr=1e-2, seed=0)
        assert metrics["gradient_accumulation"] == (4 if micro == 1 else 1)
        curves[micro] = [h.loss for h in trainer.history]
    np.testing.assert_allclose(curves[1], curves[None], rtol=1e-5)


def test_deepspeed_checkpoint_resume_is_exact(params: Params, tmp_path: Path) -> None:
    """DeepSpeed on CPU: 4 steps, checkpoint, a fresh engine resumes: the 8-step curve of one go."""
    pytest.importorskip("deepspeed")
    arch = plan_run(params, "dense").arch.to_dict()
    cfg = params.train.model_copy(update={"engine": "deepspeed", "device": "cpu", "checkpoint_every": 4})
    batches = counting_batches(8)

    def go(steps: int, ckpt: Path | None) -> Trainer:
        torch.manual_seed(0)
        trainer, _ = train(build_model(arch, VOCAB), ListLoader(batches, 16), cfg, steps=steps, batch_size=4,
                           lr=1e-2, seed=0, ckpt_dir=ckpt)
        return trainer

    straight = go(8, None)
    go(4, tmp_path)
    resumed = go(8, tmp_path)
    assert [h.loss for h in resumed.history] == [h.loss for h in straight.history]


def test_deepspeed_zero2_with_accumulation_follows_the_torch_engine(params: Params) -> None:
    """ZeRO stage 2 and 2 micro-batches per step (DeepSpeed's own accumulation) against the torch engine."""
    pytest.importorskip("deepspeed")
    arch = plan_run(params, "moe").arch.to_dict()
    curves = {}
    for engine in ("torch", "deepspeed"):
        cfg = params.train.model_copy(update={"engine": engine, "device": "cpu", "zero_stage": 2,
                                              "micro_batch_size": 2})
        torch.manual_seed(0)
        trainer, metrics = train(build_model(arch, VOCAB), ListLoader(counting_batches(6), 16), cfg, steps=6,
                                 batch_size=4, lr=1e-2, seed=0)
        assert metrics["gradient_accumulation"] == 2
        curves[engine] = [h.loss for h in trainer.history]
    assert metrics["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert metrics["deepspeed_config"]["gradient_accumulation_steps"] == 2
    np.testing.assert_allclose(curves["deepspeed"], curves["torch"], rtol=1e-4)


def test_router_bias_balancing_is_stepped_and_saved(tmp_path: Path) -> None:
    """params.yaml router: reaches the model; the trainer steps the aux-loss-free bias after each update."""
    from safetensors.torch import load_file

    raw = copy.deepcopy(PARAMS)
    raw["router"] = {"score": "sigmoid", "bias_balancing": True, "bias_update_rate": 0.01}
    raw["train"]["aux_loss_coef"] = 0.0
    p = parse_params(raw)
    work = make_work(tmp_path, p, ["moe"])
    res = run_train(p, "moe", work=work)
    cfg = read_json(work / "runs/moe/model/config.json")
    assert cfg["router"]["bias_balancing"] and res["provenance"]["params"]["router"]["score"] == "sigmoid"
    bias = load_file(str(work / "runs/moe/model/model.safetensors"))["blocks.0.ffn.router.expert_bias"]
    assert bias.abs().max() > 0  # stepped by the trainer (it starts at zero)
    model, _ = load_model(work / "runs/moe/model")
    assert torch.equal(model.blocks[0].ffn.router.expert_bias, bias)
