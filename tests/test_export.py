"""Trained runs as Hugging Face checkpoints (moe_study/hf.py, stages/export.py): transformers loads them
with no custom code and computes the project's logits; options no standard class computes are refused;
HF configs import as the project's model; the harness's hf backend scores an export as the project does.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))
transformers = pytest.importorskip("transformers")

from task_helpers import EOS, make_texts, make_tokenizer  # noqa: E402

from moe_study.accounting import Architecture, from_hf_config  # noqa: E402
from moe_study.config.schema import RouterConfig  # noqa: E402
from moe_study.hf import (  # noqa: E402
    EXPORT_INFO,
    ExportError,
    choose_family,
    export_model,
    import_config,
    import_model,
    run_export,
)
from moe_study.model.layers import ModelConfigError  # noqa: E402
from moe_study.model.lm import build_model, count_nonvocab_params, save_model  # noqa: E402

VOCAB = 61
HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"
HAS_NORMALIZE = "normalize_topk" in RouterConfig.model_fields


def moe(**kw: object) -> Architecture:
    base: dict = dict(kind="moe", d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, seq_len=32, ffn_hidden=8,
                      experts=4, top_k=2)
    return Architecture(**{**base, **kw})


def dense(**kw: object) -> Architecture:
    return moe(kind="dense", experts=1, top_k=1, ffn_hidden=24, **kw)


# (arch, router kwargs, the family it must export as): dense and every MoE variant the study uses
VARIANTS = {
    "dense": (dense(), {}, "llama"),
    "dense_untied_gqa": (dense(tie_embeddings=False), {}, "llama"),
    "dense_qkv_bias": (dense(qkv_bias=True), {}, "qwen2"),
    "dense_qk_norm_head": (dense(qk_norm="head", qkv_bias=True), {}, "qwen3"),
    "moe_top1": (moe(top_k=1), {"normalize_topk": True}, "mixtral"),
    "moe_top2": (moe(), {"normalize_topk": True}, "mixtral"),
    "moe_shared": (moe(shared_experts=2), {}, "qwen2_moe"),
    "moe_shared_gate": (moe(shared_experts=1, shared_gate=True, shared_ffn_hidden=12), {}, "qwen2_moe"),
    "moe_first_dense": (moe(first_dense_layers=1, dense_ffn_hidden=20), {}, "qwen2_moe"),
    "moe_first_dense_shared_top1": (moe(first_dense_layers=1, shared_experts=1, top_k=1, tie_embeddings=False), {},
                                    "qwen2_moe"),
    "moe_every2_qkv_bias": (moe(moe_every=2, qkv_bias=True), {}, "qwen2_moe"),
    "moe_qk_norm_head": (moe(qk_norm="head", qkv_bias=True, first_dense_layers=1), {}, "qwen3_moe"),
    "moe_qk_norm_layer": (moe(qk_norm="layer"), {}, "olmoe"),
    "moe_no_normalize": (moe(), {"normalize_topk": False}, "qwen2_moe"),
    "moe_no_normalize_top1": (moe(top_k=1, first_dense_layers=1), {"normalize_topk": False}, "qwen2_moe"),
    "moe_normalize_shared": (moe(shared_experts=1), {"normalize_topk": True}, "qwen2_moe"),
}


def trained_like(a: Architecture, router: dict, seed: int = 0) -> torch.nn.Module:
    """A model whose weights are far from the init (distinct norms, biases, routing)."""
    torch.manual_seed(seed)
    model = build_model(a, VOCAB, router=router or None).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3 if p.dim() == 1 else torch.randn_like(p) * 0.1)
    return model


def save_run(model: torch.nn.Module, directory: Path, router: dict) -> Path:
    """As the train stage saves a run: config.json records the router config the model was built with."""
    save_model(model, directory, {"arch": model.arch.to_dict(), "vocab_size": VOCAB, "eos_id": EOS,
                                  "router": model.router_config.model_dump()})
    return directory


def logits_both(model: torch.nn.Module, hf_dir: Path, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits, hf(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_loads_in_transformers_with_the_same_logits(name: str, tmp_path: Path) -> None:
    a, router, family = VARIANTS[name]
    if "normalize_topk" in router and not HAS_NORMALIZE:
        pytest.skip("RouterConfig has no normalize_topk yet (the router always renormalises)")
    model = trained_like(a, router)
    info = export_model(save_run(model, tmp_path / "model", router), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert info["family"] == cfg["model_type"] == family
    assert "auto_map" not in cfg  # no custom code
    ours, theirs = logits_both(model, tmp_path / "hf")
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max() <= 1e-4
    assert info["max_abs_logit_diff"] <= 1e-4
    if a.kind == "moe":  # the routing matters: the experts disagree, so a wrong router shows
        assert cfg.get("norm_topk_prob", True) == RouterConfig(**router).normalize_topk
    back, imported = import_model(tmp_path / "hf")  # and back into the project's model: exact
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max() <= 1e-5
    b = back.arch  # the same shape: S shared experts come back as one of width S*f_s, an ungated one with a gate
    assert [b.is_moe_layer(i) for i in range(b.n_layers)] == [a.is_moe_layer(i) for i in range(a.n_layers)]
    gate = a.d_model * a.moe_layers if a.shared_experts and not a.shared_gate else 0
    assert count_nonvocab_params(back) == tuple(n + gate for n in count_nonvocab_params(model))
    assert (b.tie_embeddings, b.qkv_bias, b.qk_norm, b.kv_heads) == (a.tie_embeddings, a.qkv_bias, a.qk_norm,
                                                                     a.kv_heads)


def test_the_logit_check_catches_a_different_router(tmp_path: Path) -> None:
    """The exactness check is sensitive: the same weights with norm_topk_prob flipped differ visibly."""
    model = trained_like(moe(shared_experts=1), {})
    export_model(save_run(model, tmp_path / "model", {}), tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["norm_topk_prob"] is RouterConfig().normalize_topk
    cfg_path.write_text(json.dumps({**cfg, "norm_topk_prob": not cfg["norm_topk_prob"]}))
    ours, theirs = logits_both(model, tmp_path / "hf")
    assert (ours - theirs).abs().max() > 1e-3


def test_ungated_shared_expert_is_a_zero_gate_and_a_doubled_down_projection(tmp_path: Path) -> None:
    model = trained_like(moe(shared_experts=1), {})
    info = export_model(save_run(model, tmp_path / "model", {}), tmp_path / "hf", check_tokens=0)
    assert info["ungated_shared_as_zero_gate"]
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    layer = "model.layers.0.mlp"
    assert not state[f"{layer}.shared_expert_gate.weight"].any()
    assert torch.equal(state[f"{layer}.shared_expert.down_proj.weight"], 2 * model.blocks[0].shared.mlp.w2.weight)


@pytest.mark.parametrize(("arch", "router", "reason"), [
    (moe(), {"score": "sigmoid"}, "sigmoid"),
    (moe(), {"bias_balancing": True}, "bias_balancing"),
    (dense(qk_norm="layer"), {}, "OLMo2"),
    (moe(qk_norm="head", shared_experts=1), {}, "shared"),
    (moe(qk_norm="layer", first_dense_layers=1), {}, "OLMoE"),
])
def test_options_no_standard_class_computes_are_refused(arch: Architecture, router: dict, reason: str,
                                                        tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=reason):
        choose_family(arch, RouterConfig(**router))
    model = build_model(arch, VOCAB, router=router or None)
    with pytest.raises(ExportError, match=reason):
        export_model(save_run(model, tmp_path / "model", router), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_tokenizer_goes_along(tmp_path: Path) -> None:
    texts = make_texts(20, seed=2)
    tok = make_tokenizer(texts, vocab=VOCAB + 200)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = build_model(dense(), tok.get_vocab_size())
    save_model(model, tmp_path / "model", {"arch": dense().to_dict(), "vocab_size": tok.get_vocab_size(),
                                          "eos_id": EOS})
    export_model(tmp_path / "model", tmp_path / "hf", tmp_path / "tokenizer.json", check_tokens=0)
    hft = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    text = texts[0][1]
    ids = tok.encode(text, add_special_tokens=False).ids
    assert hft.eos_token == "<|endoftext|>" and hft.eos_token_id == EOS == cfg.eos_token_id
    assert hft.bos_token_id == EOS == cfg.bos_token_id
    assert hft(text)["input_ids"] == [EOS, *ids]  # EOS + document, as training fed it
    assert hft(text, add_special_tokens=False)["input_ids"] == ids
    assert hft.decode(ids) == text


# --------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("path", sorted(HF_CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_published_architectures_import_as_the_projects_model(path: Path) -> None:
    """config.json only: the same shape built here (on the meta device: no storage), counted exactly."""
    cfg = json.loads(path.read_text())
    a, vocab = from_hf_config(cfg)
    imported = import_config(cfg)
    if a.mla:
        with pytest.raises(ModelConfigError, match="latent attention"):
            import_model(path, weights=False)
        return
    model, _ = import_model(path, weights=False)
    assert model.arch == Architecture(**imported["arch"])
    assert count_nonvocab_params(model) == (a.nonvocab_total, a.nonvocab_active)
    assert model.vocab_size == vocab
    if a.kind == "moe":
        assert model.router_config.score == ("sigmoid" if cfg.get("scoring_func") == "sigmoid" else "softmax")
        norm = bool(cfg.get("norm_topk_prob", cfg["model_type"] == "mixtral"))
        if HAS_NORMALIZE:
            assert model.router_config.normalize_topk == norm
        else:
            assert norm or imported["notes"]  # said, not silently changed


def test_import_cli_writes_a_project_model_dir(tmp_path: Path) -> None:
    from moe_study.hf import main
    from moe_study.model.lm import load_model

    model = trained_like(moe(first_dense_layers=1, shared_experts=1, shared_gate=True), {})
    export_model(save_run(model, tmp_path / "model", {}), tmp_path / "hf", check_tokens=0)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, config = load_model(tmp_path / "back")
    assert config["imported_weights"] and count_nonvocab_params(back) == count_nonvocab_params(model)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max() <= 1e-5
    assert main(["import", str(HF_CONFIGS / "mixtral-8x7b-v0.1.json"), "--out", str(tmp_path / "mx")]) == 0
    assert json.loads((tmp_path / "mx" / "config.json").read_text())["arch"]["experts"] == 8
    assert not (tmp_path / "mx" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------- stage
def params(enabled: bool) -> object:
    import yaml

    from moe_study.config.schema import parse_params

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["export"] = {"enabled": enabled, "check_tokens": 32}
    return parse_params(raw, "params.yaml")


def test_stage_is_cheap_when_off_and_exports_when_on(tmp_path: Path) -> None:
    p = params(False)
    run = sorted(p.runs)[0]
    rdir = tmp_path / "runs" / run
    texts = make_texts(20, seed=3)
    tok = make_tokenizer(texts, vocab=VOCAB + 200)
    (tmp_path / "tokens").mkdir()
    tok.save(str(tmp_path / "tokens" / "tokenizer.json"))
    model = build_model(moe(), tok.get_vocab_size())
    save_model(model, rdir / "model", {"arch": moe().to_dict(), "vocab_size": tok.get_vocab_size(), "eos_id": EOS})
    assert run_export(p, run, tmp_path) == {"run": run, "enabled": False}
    assert sorted(x.name for x in (rdir / "hf").iterdir()) == [EXPORT_INFO]
    rec = run_export(params(True), run, tmp_path)
    # the default router (the paper's: no top-k renormalisation) is Qwen2-MoE's norm_topk_prob=False
    assert rec["enabled"] and rec["family"] == "qwen2_moe" and rec["max_abs_logit_diff"] <= 1e-4
    names = {x.name for x in (rdir / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", EXPORT_INFO} <= names
    assert run_export(p, run, tmp_path, out=tmp_path / "manual")["enabled"]  # --out: always


def test_registry_stage_is_per_run_and_reads_the_export_params() -> None:
    from moe_study.registry import stage

    s = stage("export")
    assert s.per_run and "export" in s.params and "work/runs/{run}/model/" in s.deps
    assert s.outs == ("work/runs/{run}/hf/",)
    assert params(False).export.enabled is False  # the default study runs it as a one-line record


# ------------------------------------------------------------------------------------- lm-eval
def test_harness_hf_backend_on_an_export_agrees_with_the_projects_scoring(tmp_path: Path) -> None:
    from moe_study.config.schema import EvalConfig
    from moe_study.data.tasks import choice_items, cloze_items, encode_items, jsonl
    from moe_study.evaluation.lm_eval_adapter import run_harness_hf, write_study_tasks
    from moe_study.evaluation.tasks import evaluate_tasks

    texts = make_texts(30, seed=4)
    cfg = EvalConfig(task_items=24, choice_words=3, min_context_words=4)
    tok = make_tokenizer(texts)
    tok.save(str(tmp_path / "tokenizer.json"))
    a = moe(seq_len=256, shared_experts=1)
    torch.manual_seed(0)
    model = build_model(a, tok.get_vocab_size()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, tmp_path / "model", {"arch": a.to_dict(), "vocab_size": tok.get_vocab_size(), "eos_id": EOS})
    export_model(tmp_path / "model", tmp_path / "hf", tmp_path / "tokenizer.json", check_tokens=0)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, items in (("cloze", cloze_items(texts, cfg, tok, 24)), ("choice", choice_items(texts, cfg, tok, 24))):
        encode_items(items, tok)
        (tasks / f"{name}.jsonl").write_bytes(jsonl(items))
    write_study_tasks(tasks, tmp_path / "yaml")
    res = run_harness_hf(tmp_path / "hf", ["moe_eq_cloze", "moe_eq_choice"], tmp_path / "yaml", batch_size=8)
    ours = evaluate_tasks(model, tasks, EOS, batch_size=8)
    assert res["moe_eq_choice"]["sample_len"] == cfg.task_items
    assert res["moe_eq_cloze"]["acc,none"] == pytest.approx(ours["cloze"]["acc"])
    assert res["moe_eq_choice"]["acc_norm,none"] == pytest.approx(ours["choice"]["acc"])  # ASCII: chars = bytes
    assert 0 < ours["choice"]["acc"] < 1  # a non-trivial model: the agreement is item by item, not 0 = 0
