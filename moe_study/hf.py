"""Hugging Face interchange: a trained run as a standard `transformers` checkpoint, and back.

Export (`export_model`, `python -m stages.export --run NAME --out DIR`) writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with no custom code, and
`AutoTokenizer.from_pretrained(DIR)` reads (tokenizer.json + tokenizer_config.json, EOS = BOS = the
study's document separator, prepended by the tokenizer's post-processor as the model was trained).
The family is the closest standard one that computes *exactly* the project's function (fp32 logits
equal to <= 1e-4, tests/test_export.py); an option no standard class expresses is refused with the
reason (`ExportError`) instead of exporting a different model:

- dense -> Llama (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, GQA: the same blocks); with `qkv_bias`
  -> Qwen2 (q/k/v biased, o not: Llama's attention_bias would bias o too); with `qk_norm: head` -> Qwen3.
- MoE with softmax top-k renormalised, every layer MoE, no shared experts, q/k norm or qkv bias
  -> Mixtral: exactly this and nothing more, and the most widely supported MoE format.
- any other softmax MoE without q/k norms (top-k renormalised or not, shared experts with or without a
  gate, first dense layers, `moe_every`, qkv bias) -> Qwen2-MoE: `norm_topk_prob`, a shared expert with
  a sigmoid gate, `mlp_only_layers` + `decoder_sparse_step` (the same layer rule as
  `first_dense_layers` + `moe_every`: layer i is sparse iff i is not in the first k and (i+1) % n == 0),
  optional `qkv_bias`. DeepSeek-V2/V3 have the same MoE options (n_shared_experts,
  first_k_dense_replace, norm_topk_prob) but only with multi-head latent attention.
- softmax MoE with `qk_norm: head`, no shared experts -> Qwen3-MoE (per-head q/k RMSNorm before RoPE).
- softmax MoE with `qk_norm: layer`, every layer MoE, no shared experts -> OLMoE (q/k RMSNorm over
  all q (k) features).

Shared experts: the project's S shared experts are one SwiGLU of width S*f_s (their sum), Qwen2-MoE's
`shared_expert` of that width. Without the project's gate the export sets `shared_expert_gate` to zero
and doubles the shared down projection: sigmoid(0) * 2W = W exactly (power-of-two scalings round
nowhere), so the function is the project's to the bit; a fine-tune may then learn the gate. Without
shared experts, Qwen2-MoE gets a zero-width shared expert (output 0).

Refused (no standard non-MLA class computes it): sigmoid router scores (DeepSeek-V3 has them, but only
with multi-head latent attention), aux-loss-free bias balancing (selection bias: DeepSeek-V3 again),
q/k norms with shared experts, `qk_norm: layer` with dense layers or on a dense model (OLMo2 is post-norm).

Import (`import_config`, `import_model`, `python -m stages.export import SRC --out DIR`): a published
config.json (Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3(-MoE), DeepSeek-MoE, OLMoE) becomes the
project's arch + router, so `build_model` makes the same shape here; weights come along for the
families this module exports (a round trip is exact).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_study.accounting import Architecture, ConfigError, from_hf_config
from moe_study.config.schema import RouterConfig
from moe_study.model.layers import ModelConfigError
from moe_study.model.lm import LM, build_model, load_model

FAMILIES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
RMS_EPS = 1e-5  # moe_study.model.layers.RMSNorm's default
ROPE_THETA = 10000.0  # moe_study.model.layers.rotary_tables' base
EXPORT_INFO = "moe_study_export.json"


class ExportError(ValueError):
    """A run whose options no standard transformers class computes exactly (the message says which)."""


# ------------------------------------------------------------------------------- family choice
def normalize_topk(router: Any) -> bool:
    """Whether the router renormalises its top-k weights: RouterConfig.normalize_topk, the schema's
    default when no router config is given (what moe_study.model.lm.LM builds then)."""
    return bool((router if router is not None else RouterConfig()).normalize_topk)


def choose_family(a: Architecture, router: Any) -> str:
    """The transformers model_type that computes this model exactly, or ExportError with the reason."""
    if a.mla:
        raise ExportError("multi-head latent attention is not built by this project's model")
    if a.kind == "dense":
        if a.qk_norm == "layer":
            raise ExportError("qk_norm: layer on a dense model: no standard pre-norm dense class has q/k RMSNorms "
                              "over all features (OLMo2 has them, but normalises after attention and MLP)")
        if a.qk_norm == "head":
            return "qwen3"
        return "qwen2" if a.qkv_bias else "llama"
    score = getattr(router, "score", "softmax")
    if score != "softmax":
        raise ExportError(f"router.score: {score}: sigmoid expert scores exist in transformers only in "
                          "DeepSeek-V3 (multi-head latent attention) and GLM-4-MoE (partial rotary), neither "
                          "of which has this model's attention")
    if getattr(router, "bias_balancing", False):
        raise ExportError("router.bias_balancing: the selection-only expert bias exists in transformers only in "
                          "DeepSeek-V3-style sigmoid routers (DeepSeek-V3, GLM-4-MoE), not with softmax scores")
    every_layer = a.moe_layers == a.n_layers
    if a.qk_norm == "head":
        if a.shared_experts:
            raise ExportError("qk_norm: head with shared experts: Qwen3-MoE (per-head q/k norms) has no shared "
                              "expert, Qwen2-MoE (shared expert) no q/k norms")
        return "qwen3_moe"
    if a.qk_norm == "layer":
        if a.shared_experts or not every_layer:
            raise ExportError("qk_norm: layer needs OLMoE (q/k norms over all features), which has no shared "
                              "experts and no dense layers")
        return "olmoe"
    if every_layer and not a.shared_experts and not a.qkv_bias and normalize_topk(router):
        return "mixtral"
    return "qwen2_moe"


# ------------------------------------------------------------------------------------ config
def hf_config(a: Architecture, vocab_size: int, eos_id: int, router: Any, family: str) -> dict[str, Any]:
    """The config.json keys of `family` for this architecture (given to the transformers config class)."""
    cfg: dict[str, Any] = dict(
        model_type=family, architectures=[ARCHITECTURES[family]], vocab_size=vocab_size,
        hidden_size=a.d_model, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.kv_heads, head_dim=a.head_size, max_position_embeddings=a.seq_len,
        rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        hidden_act="silu", tie_word_embeddings=a.tie_embeddings, attention_dropout=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, dtype="float32",
    )
    if family == "llama":
        cfg.update(intermediate_size=a.ffn_hidden, attention_bias=False, mlp_bias=False)
    elif family in ("qwen2", "qwen3"):
        cfg.update(intermediate_size=a.ffn_hidden, use_sliding_window=False)
        if family == "qwen3":
            cfg["attention_bias"] = a.qkv_bias  # biases q, k, v and o: o's stays zero
    elif family == "mixtral":
        cfg.update(intermediate_size=a.ffn_hidden, num_local_experts=a.experts, num_experts_per_tok=a.top_k,
                   sliding_window=None)
    elif family == "olmoe":
        cfg.update(intermediate_size=a.ffn_hidden, num_experts=a.experts, num_experts_per_tok=a.top_k,
                   norm_topk_prob=normalize_topk(router), attention_bias=a.qkv_bias, clip_qkv=None)
    else:  # qwen2_moe, qwen3_moe
        cfg.update(intermediate_size=a.dense_width, moe_intermediate_size=a.ffn_hidden, num_experts=a.experts,
                   num_experts_per_tok=a.top_k, norm_topk_prob=normalize_topk(router),
                   decoder_sparse_step=a.moe_every, mlp_only_layers=list(range(a.first_dense_layers)),
                   use_sliding_window=False)
        if family == "qwen2_moe":
            cfg.update(qkv_bias=a.qkv_bias, shared_expert_intermediate_size=a.shared_width * a.shared_experts)
        else:
            cfg["attention_bias"] = a.qkv_bias
    return cfg


# ----------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Pair:
    """One HF tensor and where it comes from: project key (None: a constant), transform."""

    hf: str
    ours: str | None
    how: str = "same"  # same | experts (transpose dims 1, 2) | double | zeros | zero_bias


def weight_pairs(a: Architecture, family: str) -> Iterator[Pair]:
    o_bias = family in ("qwen3", "qwen3_moe", "olmoe") and a.qkv_bias  # attention_bias also biases o
    yield Pair("model.embed_tokens.weight", "tok_emb.weight")
    for i in range(a.n_layers):
        b, h = f"blocks.{i}", f"model.layers.{i}"
        yield Pair(f"{h}.input_layernorm.weight", f"{b}.norm1.weight")
        yield Pair(f"{h}.post_attention_layernorm.weight", f"{b}.norm2.weight")
        for p in "qkv":
            yield Pair(f"{h}.self_attn.{p}_proj.weight", f"{b}.attn.{p}.weight")
            if a.qkv_bias:
                yield Pair(f"{h}.self_attn.{p}_proj.bias", f"{b}.attn.{p}.bias")
        yield Pair(f"{h}.self_attn.o_proj.weight", f"{b}.attn.o.weight")
        if o_bias:
            yield Pair(f"{h}.self_attn.o_proj.bias", f"{b}.attn.o.weight", "zero_bias")
        if a.qk_norm != "none":
            yield Pair(f"{h}.self_attn.q_norm.weight", f"{b}.attn.q_norm.weight")
            yield Pair(f"{h}.self_attn.k_norm.weight", f"{b}.attn.k_norm.weight")
        if not a.is_moe_layer(i):
            for hf, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                yield Pair(f"{h}.mlp.{hf}.weight", f"{b}.ffn.{ours}.weight")
            continue
        yield Pair(f"{h}.mlp.gate.weight", f"{b}.ffn.router.gate.weight")
        yield Pair(f"{h}.mlp.experts.gate_up_proj", f"{b}.ffn.experts.w13", "experts")
        yield Pair(f"{h}.mlp.experts.down_proj", f"{b}.ffn.experts.w2", "experts")
        if family == "qwen2_moe":
            s = f"{h}.mlp.shared_expert"
            if a.shared_experts:
                yield Pair(f"{s}.gate_proj.weight", f"{b}.shared.mlp.w1.weight")
                yield Pair(f"{s}.up_proj.weight", f"{b}.shared.mlp.w3.weight")
                yield Pair(f"{s}.down_proj.weight", f"{b}.shared.mlp.w2.weight",
                           "same" if a.shared_gate else "double")
            else:  # zero-width shared expert
                for p in ("gate_proj", "up_proj", "down_proj"):
                    yield Pair(f"{s}.{p}.weight", None, "zeros")
            yield Pair(f"{h}.mlp.shared_expert_gate.weight",
                       f"{b}.shared.gate.weight" if a.shared_gate else None, "same" if a.shared_gate else "zeros")
    yield Pair("model.norm.weight", "norm.weight")
    if not a.tie_embeddings:
        yield Pair("lm_head.weight", "lm_head.weight")


def to_hf_state(model: LM, family: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The HF state dict of `model` (`shapes`: the HF model's own, for the constant tensors)."""
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for p in weight_pairs(model.arch, family):
        if p.how == "zeros":
            out[p.hf] = torch.zeros(shapes[p.hf])
        elif p.how == "zero_bias":
            out[p.hf] = torch.zeros(ours[p.ours].shape[0])
        elif p.how == "experts":
            out[p.hf] = ours[p.ours].transpose(1, 2).contiguous()
        elif p.how == "double":
            out[p.hf] = ours[p.ours] * 2.0
        else:
            out[p.hf] = ours[p.ours]
    return out


def from_hf_state(state: dict[str, torch.Tensor], a: Architecture, family: str) -> dict[str, torch.Tensor]:
    """The project's state dict from an HF one (the inverse of `to_hf_state`; ungated shared experts
    and zero biases must be what the export wrote, or the function would change)."""
    out: dict[str, torch.Tensor] = {}
    for p in weight_pairs(a, family):
        t = state[p.hf].detach().to("cpu", torch.float32)
        if p.how in ("zeros", "zero_bias"):
            if t.abs().max() > 0 if t.numel() else False:
                raise ExportError(f"{p.hf} is not zero: the project's model has no such parameter")
            continue
        out[p.ours] = t.transpose(1, 2).contiguous() if p.how == "experts" else t / 2.0 if p.how == "double" else t
    return out


# -------------------------------------------------------------------------------------- export
def hf_model_from(model: LM, eos_id: int) -> tuple[Any, str]:
    """(transformers model with `model`'s weights, family): built in memory, checked key by key."""
    import transformers

    family = choose_family(model.arch, model.router_config)
    cfg = hf_config(model.arch, model.vocab_size, eos_id, model.router_config, family)
    config = transformers.AutoConfig.for_model(**cfg)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    own = hf.state_dict()
    state = to_hf_state(model, family, {k: v.shape for k, v in own.items()})
    if model.arch.tie_embeddings and "lm_head.weight" in own:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ExportError(f"{family}: the mapping misses {missing} and has extra {unexpected} (transformers "
                          f"{transformers.__version__})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ExportError(f"{family}: {k} has shape {tuple(v.shape)}, transformers wants {tuple(own[k].shape)}")
    hf.load_state_dict(state, strict=True)
    return hf.eval(), family


def export_tokenizer(tokenizer_json: Path | str, out: Path, eos: str, seq_len: int) -> None:
    """tokenizer.json (EOS prepended by the post-processor, as documents were fed in training: EOS + doc)
    and tokenizer_config.json (EOS = BOS = the document separator), for AutoTokenizer."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise ExportError(f"{tokenizer_json} has no token {eos!r}")
    tok.no_truncation()
    tok.no_padding()
    tok.post_processor = processors.TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A {eos} $B:1",
                                                       special_tokens=[(eos, eos_id)])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos, "unk_token": None,
           "pad_token": None, "add_bos_token": True, "add_eos_token": False, "model_max_length": seq_len,
           "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": eos, "eos_token": eos}, indent=2) + "\n")


def export_model(model_dir: Path | str, out: Path | str, tokenizer_json: Path | str | None = None,
                 eos: str = "<|endoftext|>", check_tokens: int = 64) -> dict[str, Any]:
    """Write the HF checkpoint of a project model directory into `out` (overwritten); returns the record
    (family, max |logit difference| on `check_tokens` random tokens after reloading from disk)."""
    import transformers

    model, config = load_model(model_dir)
    model.eval()
    eos_id = int(config.get("eos_id", 0))
    hf, family = hf_model_from(model, eos_id)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    hf.save_pretrained(out, safe_serialization=True)
    if tokenizer_json is not None:
        export_tokenizer(tokenizer_json, out, eos, model.arch.seq_len)
    info = {"family": family, "architecture": ARCHITECTURES[family], "transformers": transformers.__version__,
            "source": str(model_dir), "run": config.get("run"), "eos_id": eos_id,
            "normalize_topk": normalize_topk(model.router_config) if model.arch.kind == "moe" else None,
            "ungated_shared_as_zero_gate": bool(family == "qwen2_moe" and model.arch.shared_experts
                                                and not model.arch.shared_gate)}
    if check_tokens:
        info["max_abs_logit_diff"] = logit_diff(model, out, check_tokens)
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def logit_diff(model: LM, hf_dir: Path | str, n_tokens: int = 64, seed: int = 0) -> float:
    """max |logits(project) - logits(AutoModelForCausalLM.from_pretrained(hf_dir))| on random tokens."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size, (2, min(n_tokens, model.arch.seq_len)), generator=g)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(input_ids=ids).logits.float()
    return float((ours - theirs).abs().max())


# -------------------------------------------------------------------------------------- import
def _prefix_dense_layers(cfg: dict[str, Any]) -> int:
    """mlp_only_layers as a first_dense_layers count (only a prefix 0..k-1 is the project's rule)."""
    layers = sorted(int(i) for i in cfg.get("mlp_only_layers") or [])
    if layers != list(range(len(layers))):
        raise ConfigError(f"mlp_only_layers={layers}: only the first k layers can be dense here "
                          "(first_dense_layers)")
    return len(layers)


def import_config(cfg: dict[str, Any] | Path | str) -> dict[str, Any]:
    """{"arch", "vocab_size", "router", "family", "notes"} of a Hugging Face config.json: the project's
    model of the same shape (`build_model(arch, vocab_size, router=router)`)."""
    from moe_study.config.schema import RouterConfig

    if not isinstance(cfg, dict):
        cfg = json.loads(Path(cfg).read_text())
    cfg = dict(cfg)
    first_dense = _prefix_dense_layers(cfg)
    cfg.pop("mlp_only_layers", None)
    mt = cfg.get("model_type", "")
    notes: list[str] = []
    o_bias = mt in ("llama", "mistral", "qwen3", "qwen3_moe", "olmoe") and bool(cfg.pop("attention_bias", False))
    if o_bias:
        notes.append("attention_bias=true also biases o_proj, which this project's attention has not: q/k/v biases "
                     "only (a weights import checks that o_proj's bias is zero)")
    a, vocab = from_hf_config(cfg)
    arch = a.to_dict()
    arch["first_dense_layers"] = first_dense or arch.get("first_dense_layers", 0)
    if not a.mla and arch.get("head_dim") == a.d_model // a.n_heads:  # the defaults, as the project writes them
        arch["head_dim"] = None
    if arch.get("n_kv_heads") == a.n_heads:
        arch["n_kv_heads"] = None
    if o_bias:
        arch["qkv_bias"] = True
    if mt == "qwen2_moe":  # transformers 5 makes Qwen2-MoE's q/k/v biases optional
        arch["qkv_bias"] = bool(cfg.get("qkv_bias", True))
    router: dict[str, Any] = {}
    if a.kind == "moe":
        scoring = cfg.get("scoring_func", "softmax")
        router["score"] = "sigmoid" if scoring == "sigmoid" else "softmax"
        if cfg.get("topk_method") == "noaux_tc":
            router["bias_balancing"] = True
        norm = bool(cfg.get("norm_topk_prob", mt == "mixtral"))
        if "normalize_topk" in RouterConfig.model_fields:
            router["normalize_topk"] = norm
        elif not norm:
            notes.append("norm_topk_prob=false: this project's router always renormalises the top-k weights "
                         "(RouterConfig has no normalize_topk), so the imported model routes with renormalised "
                         "weights")
        if float(cfg.get("routed_scaling_factor", 1.0)) != 1.0:
            notes.append(f"routed_scaling_factor={cfg['routed_scaling_factor']} is not modelled (weights only)")
    return {"arch": arch, "vocab_size": vocab, "router": router or None, "family": mt,
            "eos_id": cfg.get("eos_token_id") if isinstance(cfg.get("eos_token_id"), int) else None, "notes": notes}


def import_model(src: Path | str, weights: bool = True, device: str = "meta") -> tuple[LM, dict[str, Any]]:
    """The project's LM of a HF checkpoint directory (or a config.json path): weights loaded from the
    checkpoint when `weights` and the family is one this module exports (exact round trip); otherwise
    the shape only (on `device`: "meta" builds no storage, "cpu" a randomly initialised model)."""
    src = Path(src)
    cfg_path = src / "config.json" if src.is_dir() else src
    imported = import_config(cfg_path)
    arch = imported["arch"]
    if not weights:
        with torch.device(device):
            model = build_model(arch, imported["vocab_size"], router=imported["router"])
        return model, imported
    import transformers

    family = imported["family"]
    if family not in FAMILIES:
        raise ExportError(f"model_type {family!r}: weights import covers {FAMILIES} (use weights=False for the shape)")
    model = build_model(arch, imported["vocab_size"], router=imported["router"]).eval()
    if choose_family(model.arch, model.router_config) != family and family != "qwen2_moe":
        raise ExportError(f"{cfg_path}: {family} checkpoint with options this project maps elsewhere")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(cfg_path.parent), dtype=torch.float32)
    state = from_hf_state(hf.state_dict(), model.arch, family)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("expert_bias",))]
    if missing or unexpected:
        raise ModelConfigError(f"{src}: weights do not match (missing {missing}, unexpected {unexpected})")
    return model, imported


# --------------------------------------------------------------------------------------- stage
MAX_LOGIT_DIFF = 1e-4


def run_export(p: Any, run: str, work: Path | str = "work", out: Path | str | None = None) -> dict[str, Any]:
    """export@run: work/runs/<run>/model -> `out` (default work/runs/<run>/hf/) as a transformers
    checkpoint with the study's tokenizer. In the DAG (`out` None) with `export.enabled: false` it writes
    only the record {"enabled": false}, so the default study pays nothing but a process start; an
    explicit `out` always exports. Refuses (ExportError) an option no standard class computes, or a
    reloaded checkpoint whose logits differ by more than MAX_LOGIT_DIFF."""
    from moe_study.io import atomic_path

    p.run(run)
    work = Path(work)
    model_dir, tokens = work / "runs" / run / "model", work / "tokens"
    dest = Path(out) if out is not None else work / "runs" / run / "hf"
    if out is None and not p.export.enabled:
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            record = {"run": run, "enabled": False}
            (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=2) + "\n")
        return record
    from moe_study.hashing import sha256_file, sha256_tree
    from moe_study.provenance import provenance

    with atomic_path(dest) as tmp:
        record = export_model(model_dir, tmp, tokens / "tokenizer.json", p.tokenizer.eos, p.export.check_tokens)
        inputs = {"model": sha256_tree(model_dir), "tokenizer": sha256_file(tokens / "tokenizer.json")}
        record.update(run=run, enabled=True, provenance=provenance(
            "export", inputs, {"export": p.export.model_dump(), "eos": p.tokenizer.eos, "run": run}))
        if record.get("max_abs_logit_diff", 0.0) > MAX_LOGIT_DIFF:
            raise ExportError(f"{run}: the exported {record['family']} model's logits differ from the run's by "
                              f"{record['max_abs_logit_diff']:.3g} > {MAX_LOGIT_DIFF}")
        (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_study.hf import SRC --out DIR [--no-weights]`: a HF checkpoint (or config.json) as a
    project model directory: config.json (the arch `build_model` and `plan count` read) and, when SRC
    has weights of a family this module exports, model.safetensors (then `load_model` reads it)."""
    import argparse

    from moe_study.model.lm import save_model

    ap = argparse.ArgumentParser(prog="python -m moe_study.hf", description=main.__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="a Hugging Face checkpoint or config.json -> a project model directory")
    imp.add_argument("src")
    imp.add_argument("--out", required=True)
    imp.add_argument("--no-weights", action="store_true", help="shape only: config.json, no weights")
    a = ap.parse_args(argv)
    try:
        src = Path(a.src)
        weights = not a.no_weights and (src.is_dir() and any(src.glob("*.safetensors")))
        model, imported = import_model(src, weights=weights, device="meta")  # meta: the shape, no storage
    except (ExportError, ConfigError, ModelConfigError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=__import__("sys").stderr)
        return 2
    config = {"arch": imported["arch"], "vocab_size": imported["vocab_size"], "imported_from": str(src),
              "imported_weights": weights, **({"router": imported["router"]} if imported["router"] else {}),
              **({"eos_id": imported["eos_id"]} if imported["eos_id"] is not None else {})}
    if weights:
        save_model(model, Path(a.out), config)
    else:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for note in imported["notes"]:
        print(f"note: {note}")
    print(f"wrote {a.out} ({imported['family']} -> {imported['arch']['kind']}, weights: {weights})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
