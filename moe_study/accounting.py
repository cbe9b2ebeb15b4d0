"""The accounting formulas of the equal-resource study, in one place.

Conventions of arXiv 2506.12119: N counts non-vocabulary parameters (token embedding and LM head
excluded); the activation rate is r_a = N_active / N; every run gets the same N, the same training
compute C and the same unique tokens U, so an MoE run reads T_i = C / F_i tokens (F_i its training
FLOPs per token), about 1/r_a times the dense run's, by re-reading U for more epochs.

Parameters (exact, checked against the real module by tests/test_model.py, and against the published
totals of Llama, Mixtral, Qwen-MoE, DeepSeek-MoE and OLMoE by tests/test_accounting.py):
- attention: q (d -> H*h), k and v (d -> KV*h, GQA when KV < H), o (H*h -> d); optional q/k/v biases;
  optional q/k norms ("layer": one RMSNorm over all q features and one over all k features, as
  OLMoE; "head": one RMSNorm of size h shared by the heads, as Qwen3); rotary positions (no params).
- FFN: SwiGLU, 3 d f. An MoE layer: E routed experts of width f_e, a bias-free router (d E),
  S shared experts of width f_s (always active; 3 d f_s each) and an optional sigmoid gate on the
  shared path (d, Qwen2-MoE). Layer i is MoE iff i >= first_dense_layers and (i+1) % moe_every == 0
  (the Qwen2-MoE `decoder_sparse_step` rule; DeepSeek's `first_k_dense_replace`); the other layers of an
  MoE model are dense SwiGLUs of width dense_ffn_hidden.
- norms: RMSNorm (weight only), two per layer and a final one.
- active = everything a token uses: all non-expert params, the shared experts and k of E routed experts.
- embeddings: `count_embeddings="nonvocab"` (the study's N) excludes the token embedding and the LM
  head; `"with_embeddings"` adds V d (tied) or 2 V d (untied) to total *and* active, as published
  counts do (Mixtral-8x7B: 46.7B total, 12.9B active).

Training FLOPs per token (forward + backward = 3 x forward, the backward doing two matmuls per
forward matmul: Kaplan et al. 2020 sec. 2.1; Hoffmann et al. 2022 app. F; Chowdhery et al. 2022
app. B), counting matmuls only, 2 FLOPs per multiply-add:
    forward = 2 * P_mm + 4 * L * S * H * h  [+ 2 * d * V for the LM head]
P_mm are the active matmul weights (attention projections, active FFN/expert weights, the router,
the shared-expert gate; not biases, norms or embeddings), the second term is attention's QK^T and
AV over a full S x S score matrix (as PaLM's 6N + 12 L H Q T and torch's FlopCounterMode count it;
a causal kernel may skip about half). Element-wise work (norms, SiLU, softmax, rotary) is not
counted, as in the references. Compute conventions for the token budget (`budget.compute_convention`):
- "6n":       F = 6 N_active (Kaplan's C = 6 N T);
- "nonvocab": F = 3 M, M = the forward FLOPs above without the LM head (the paper's C = 3 M D,
  following DeepSeek LLM's non-embedding M);
- "exact":    F = 3 (M + 2 d V), all the matmuls the hardware runs (what FlopCounterMode measures);
  the default since issue 14: under "nonvocab" the LM head is free, so a run that reads more tokens
  gets more real compute (the tiny study's MoE r25 used 1.66x the dense run's actual FLOPs).
What a run's `train_flops` means therefore depends on the convention: F_i x T_i in the budget's
convention (= C up to whole steps, the number the study equalises); `train_flops_exact` (plan.json,
train.json, the `runs` table) is always the exact count (every matmul incl. the LM head and attention
scores) x the tokens read, so a run's real compute can be compared with the dense run's under any
convention. Under "nonvocab" the planner warns (log and the plan's `warnings`) when the LM head is more
than HEAD_SHARE_WARN of a run's exact FLOPs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from moe_study.config.schema import ModelConfig, Params, PlannerConfig, RunConfig

log = logging.getLogger("moe_study.accounting")

COMPUTE_CONVENTIONS = ("6n", "nonvocab", "exact")
HEAD_SHARE_WARN = 0.05  # "nonvocab" convention: warn when the LM head is more than this of a run's exact FLOPs
EMBEDDING_CONVENTIONS = ("nonvocab", "with_embeddings")


# ------------------------------------------------------------------------------------- the terms
def swiglu_params(d: int, f: int) -> int:
    """w1, w3 (d -> f) and w2 (f -> d), bias-free."""
    return 3 * d * f


def norm_params(d: int) -> int:
    """RMSNorm: one weight per feature."""
    return d


def vocab_params(d: int, vocab_size: int, tie_embeddings: bool) -> int:
    """Token embedding, plus the LM head when it is not tied to it."""
    emb = vocab_size * d
    return emb if tie_embeddings else 2 * emb


@dataclass(frozen=True)
class Architecture:
    """One decoder-only LM. The defaults of every optional field are the original model's."""

    kind: str  # "dense" | "moe"
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    ffn_hidden: int  # dense: the FFN width; moe: the width of one routed expert
    experts: int = 1
    top_k: int = 1
    tie_embeddings: bool = True
    n_kv_heads: int | None = None  # GQA: key/value heads; None = n_heads (MHA)
    head_dim: int | None = None  # None = d_model // n_heads
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "layer" | "head"
    shared_experts: int = 0
    shared_ffn_hidden: int | None = None  # width of one shared expert; None = ffn_hidden
    shared_gate: bool = False  # sigmoid(x w_g) scales the shared experts' output (Qwen2-MoE)
    dense_ffn_hidden: int | None = None  # FFN width of the dense layers of an MoE model; None = ffn_hidden
    first_dense_layers: int = 0
    moe_every: int = 1
    # multi-head latent attention (DeepSeek-V2/V3), counted for `plan count` only (the model does not
    # build it): q through an optional low-rank q_lora_rank, k/v through a shared kv_lora_rank latent,
    # head_dim = the non-rotary q/k head size, plus qk_rope_head_dim rotary dims and v_head_dim values
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 0
    v_head_dim: int | None = None

    # -------------------------------------------------------------------------------- structure
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def shared_width(self) -> int:
        return self.ffn_hidden if self.shared_ffn_hidden is None else self.shared_ffn_hidden

    @property
    def dense_width(self) -> int:
        """Width of the SwiGLU of a dense layer (every layer of a dense model)."""
        if self.kind == "dense" or self.dense_ffn_hidden is None:
            return self.ffn_hidden
        return self.dense_ffn_hidden

    def is_moe_layer(self, i: int) -> bool:
        return self.kind == "moe" and i >= self.first_dense_layers and (i + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def dense_layers(self) -> int:
        return self.n_layers - self.moe_layers

    # ------------------------------------------------------------------------------- the counts
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    def attention_matmul_params(self) -> int:
        """Weights of q, k, v, o (the matmuls of attention)."""
        d, q, kv = self.d_model, self.n_heads * self.head_size, self.kv_heads * self.head_size
        if self.mla:
            H, qk, v, r = self.n_heads, self.head_size + self.qk_rope_head_dim, self._v_dim, self.kv_lora_rank
            q_proj = d * self.q_lora_rank + self.q_lora_rank * H * qk if self.q_lora_rank else d * H * qk
            kv_proj = d * (r + self.qk_rope_head_dim) + r * H * (self.head_size + v)
            return q_proj + kv_proj + H * v * d
        return d * q + 2 * d * kv + q * d

    @property
    def _v_dim(self) -> int:
        return self.head_size if self.v_head_dim is None else self.v_head_dim

    def attention_params(self) -> int:
        if self.mla:  # plus the RMSNorms of the q and kv latents
            return self.attention_matmul_params() + (self.q_lora_rank or 0) + self.kv_lora_rank
        q, kv, h = self.n_heads * self.head_size, self.kv_heads * self.head_size, self.head_size
        bias = q + 2 * kv if self.qkv_bias else 0
        qk_norm = {"none": 0, "layer": q + kv, "head": 2 * h}[self.qk_norm]
        return self.attention_matmul_params() + bias + qk_norm

    def moe_ffn_params(self, routed: int) -> int:
        """One MoE layer's FFN with `routed` of its E experts counted (E for total, k for active)."""
        d = self.d_model
        shared = self.shared_experts * swiglu_params(d, self.shared_width)
        gate = d if self.shared_gate and self.shared_experts else 0
        return routed * swiglu_params(d, self.ffn_hidden) + shared + d * self.experts + gate

    def _count(self, routed: int) -> int:
        d = self.d_model
        per_layer = self.attention_params() + 2 * norm_params(d)
        ffn = self.dense_layers * swiglu_params(d, self.dense_width) + self.moe_layers * self.moe_ffn_params(routed)
        return self.n_layers * per_layer + ffn + norm_params(d)

    @property
    def nonvocab_total(self) -> int:
        return self._count(self.experts if self.kind == "moe" else 0)

    @property
    def nonvocab_active(self) -> int:
        return self._count(self.top_k if self.kind == "moe" else 0)

    @property
    def activation_rate(self) -> float:
        return self.nonvocab_active / self.nonvocab_total

    def total_params(self, vocab_size: int, count_embeddings: str = "nonvocab") -> int:
        return self.nonvocab_total + _embeddings(self, vocab_size, count_embeddings)

    def active_params(self, vocab_size: int, count_embeddings: str = "nonvocab") -> int:
        return self.nonvocab_active + _embeddings(self, vocab_size, count_embeddings)

    # -------------------------------------------------------------------------------- the FLOPs
    def active_matmul_params(self) -> int:
        """Matmul weights one token multiplies by (no biases, norms or embeddings; LM head excluded)."""
        d = self.d_model
        moe = self.moe_layers
        ffn = self.dense_layers * swiglu_params(d, self.dense_width)
        if moe:
            gate = d if self.shared_gate and self.shared_experts else 0
            ffn += moe * (self.top_k * swiglu_params(d, self.ffn_hidden)
                          + self.shared_experts * swiglu_params(d, self.shared_width) + d * self.experts + gate)
        return self.n_layers * self.attention_matmul_params() + ffn

    def attention_score_flops(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token of QK^T and AV over a full S x S score matrix, all layers."""
        s = self.seq_len if seq_len is None else seq_len
        if self.mla:  # QK^T over the non-rotary + rotary dims, AV over v_head_dim
            return 2 * self.n_layers * s * self.n_heads * (self.head_size + self.qk_rope_head_dim + self._v_dim)
        return 4 * self.n_layers * s * self.n_heads * self.head_size

    def forward_flops(self, vocab_size: int | None = None, seq_len: int | None = None) -> int:
        """M: forward FLOPs per token; with `vocab_size`, the LM head's 2 d V included."""
        head = 2 * self.d_model * vocab_size if vocab_size else 0
        return 2 * self.active_matmul_params() + self.attention_score_flops(seq_len) + head

    def train_flops_per_token(self, convention: str = "exact", vocab_size: int | None = None) -> float:
        """Training (forward + backward) FLOPs per token under a compute convention."""
        if convention == "6n":
            return 6.0 * self.nonvocab_active
        if convention == "nonvocab":
            return 3.0 * self.forward_flops()
        if convention == "exact":
            if not vocab_size:
                raise ValueError("the exact FLOPs convention needs the vocabulary size")
            return 3.0 * self.forward_flops(vocab_size)
        raise ValueError(f"compute convention {convention!r} is not one of {COMPUTE_CONVENTIONS}")

    def to_dict(self) -> dict:
        return asdict(self)


def _embeddings(a: Architecture, vocab_size: int, count_embeddings: str) -> int:
    if count_embeddings == "nonvocab":
        return 0
    if count_embeddings == "with_embeddings":
        return vocab_params(a.d_model, vocab_size, a.tie_embeddings)
    raise ValueError(f"count_embeddings={count_embeddings!r} is not one of {EMBEDDING_CONVENTIONS}")


def unique_passes(tokens: int, unique_tokens: int, seq_len: int) -> float:
    """Passes over the unique stream that `tokens` training tokens make: one epoch's stream is U tokens
    (the unique docs, each after its EOS: moe_study/data/shards.py), read as (U - 1) // seq_len windows of
    seq_len + 1 (inputs and shifted targets); the run reads tokens / seq_len windows."""
    per_pass = max(1, (unique_tokens - 1) // seq_len)
    return tokens / seq_len / per_pass


def train_flops(n_active: float, tokens: float) -> float:
    """C = 6 N_active T (Kaplan's approximation; the "6n" convention)."""
    return 6.0 * n_active * tokens


# ------------------------------------------------------------------------- Hugging Face configs
class ConfigError(ValueError):
    """A config.json the accounting cannot read (names the key or the unsupported feature)."""


def _get(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is None:
        raise ConfigError(f"config.json has none of the keys {list(keys)}")
    return default


def from_hf_config(cfg: dict) -> tuple[Architecture, int]:
    """(Architecture, vocab_size) of a Hugging Face config.json (Llama, Mistral, Mixtral, Qwen2,
    Qwen2-MoE, DeepSeek-MoE, OLMoE) or of the project's own model/config.json ({"arch", "vocab_size"})."""
    if "arch" in cfg and "vocab_size" in cfg:
        return Architecture(**cfg["arch"]), int(cfg["vocab_size"])
    mt = cfg.get("model_type", "")
    if mt not in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "deepseek", "olmoe",
                  "deepseek_v2", "deepseek_v3"):
        raise ConfigError(f"model_type={mt!r} is not a supported family (llama, mistral, mixtral, qwen2, "
                          "qwen2_moe, qwen3, qwen3_moe, deepseek, deepseek_v2, deepseek_v3, olmoe)")
    # (DeepSeek-V3's e_score_correction_bias, E numbers per MoE layer that steer routing, is not counted:
    # 15k of 671B; nor are multi-token-prediction layers, which its published 671B also excludes)
    if _get(cfg, "hidden_act", default="silu") != "silu":
        raise ConfigError(f"hidden_act={cfg['hidden_act']!r}: only SwiGLU (silu) FFNs are modelled")
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not modelled")
    if cfg.get("attention_bias") and mt not in ("qwen2", "qwen2_moe"):  # (deepseek_v2/v3: MLA has none)
        raise ConfigError("attention_bias=true (which also biases o) is not modelled")
    d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    base: dict[str, Any] = dict(
        d_model=d, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
        seq_len=int(_get(cfg, "max_position_embeddings", "seq_length", default=2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # the HF default of these families
        n_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=cfg.get("head_dim") or None,
        qkv_bias=mt in ("qwen2", "qwen2_moe"),
        qk_norm={"olmoe": "layer", "qwen3": "head", "qwen3_moe": "head"}.get(mt, "none"),
    )
    if mt in ("deepseek_v2", "deepseek_v3"):
        base.update(kv_lora_rank=int(cfg["kv_lora_rank"]), q_lora_rank=cfg.get("q_lora_rank") or None,
                    head_dim=int(cfg["qk_nope_head_dim"]), qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
                    v_head_dim=int(cfg["v_head_dim"]), n_kv_heads=heads)
    experts = _get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    dense_f = int(cfg["intermediate_size"])
    if not experts:
        return Architecture(kind="dense", ffn_hidden=dense_f, **base), int(cfg["vocab_size"])
    if cfg.get("mlp_only_layers"):
        raise ConfigError("mlp_only_layers (an irregular dense/MoE layer list) is not modelled")
    moe: dict[str, Any] = dict(kind="moe", experts=int(experts), top_k=int(cfg["num_experts_per_tok"]))
    if mt in ("mixtral", "olmoe"):
        moe["ffn_hidden"] = dense_f  # intermediate_size is the expert width
    else:
        moe["ffn_hidden"] = int(cfg["moe_intermediate_size"])
        moe["dense_ffn_hidden"] = dense_f
    if mt == "qwen2_moe":
        width = int(cfg.get("shared_expert_intermediate_size") or 0)
        if width:
            moe.update(shared_experts=1, shared_ffn_hidden=width, shared_gate=True)
        moe["moe_every"] = int(cfg.get("decoder_sparse_step", 1))
    if mt == "qwen3_moe":
        moe["moe_every"] = int(cfg.get("decoder_sparse_step", 1))
    if mt in ("deepseek", "deepseek_v2", "deepseek_v3"):
        moe["shared_experts"] = int(cfg.get("n_shared_experts") or 0)
        moe["first_dense_layers"] = int(cfg.get("first_k_dense_replace", 0))
        if int(cfg.get("moe_layer_freq", 1)) != 1:
            raise ConfigError("moe_layer_freq != 1 (DeepSeek's layer_idx % freq rule) is not modelled")
    return Architecture(**base, **moe), int(cfg["vocab_size"])


SIZE_LIMIT = 1 << 40  # any count or width beyond this is a typo or an overflow, not a model
_POSITIVE = ("d_model", "n_layers", "n_heads", "seq_len", "ffn_hidden", "experts", "top_k", "moe_every")
# the config.json keys of the Hugging Face families, so an error names the key the user can fix
HF_KEYS = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "seq_len": "max_position_embeddings",
           "ffn_hidden": "intermediate_size / moe_intermediate_size", "top_k": "num_experts_per_tok",
           "experts": "num_local_experts / num_experts / n_routed_experts"}


def _field(name: str) -> str:
    return f"{name} ({HF_KEYS[name]})" if name in HF_KEYS else name


def check_numbers(cfg: Any, where: str = "") -> None:
    """Every number in a config.json finite and within SIZE_LIMIT (names the key): JSON allows 1e400
    (inf) and 10**30, which would otherwise surface as an OverflowError or an absurd count."""
    items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg) if isinstance(cfg, list) else ()
    for k, v in items:
        key = f"{where}.{k}" if where else str(k)
        if isinstance(v, dict | list):
            check_numbers(v, key)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v}: must be a finite number")
        elif isinstance(v, int | float) and not isinstance(v, bool) and abs(v) > SIZE_LIMIT:
            raise ConfigError(f"{key}={v}: larger than any model ({SIZE_LIMIT}); a typo or an overflow?")


def check_architecture(a: Architecture, vocab_size: int) -> None:
    """The rules params.yaml's schema applies, for an architecture read from a config.json: whole
    numbers in range, top_k within experts, heads that divide; one ConfigError naming the field."""
    for f in fields(a):
        v = getattr(a, f.name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            if not isinstance(v, int):
                raise ConfigError(f"{_field(f.name)}={v!r}: must be a whole number")
            if v < (1 if f.name in _POSITIVE else 0):
                raise ConfigError(f"{_field(f.name)}={v}: must be {'positive' if f.name in _POSITIVE else '>= 0'}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= SIZE_LIMIT:
        raise ConfigError(f"vocab_size={vocab_size!r}: must be a positive whole number")
    if a.kind not in ("dense", "moe"):
        raise ConfigError(f"kind={a.kind!r}: must be dense or moe")
    if a.top_k > a.experts:
        raise ConfigError(f"{_field('top_k')}={a.top_k} exceeds {_field('experts')}={a.experts}")
    if a.n_kv_heads is not None and (a.n_kv_heads < 1 or a.n_heads % a.n_kv_heads):
        raise ConfigError(f"n_kv_heads={a.n_kv_heads} must divide n_heads={a.n_heads}")
    if a.head_dim is None and a.d_model % a.n_heads:
        raise ConfigError(f"d_model={a.d_model} is not divisible by n_heads={a.n_heads}")
    if a.kind == "moe" and a.first_dense_layers >= a.n_layers:
        raise ConfigError(f"first_dense_layers={a.first_dense_layers} leaves no MoE layer of {a.n_layers}")


def read_count_config(cfg: Any) -> tuple[Architecture, int]:
    """`stages.plan count`'s reader: a JSON object, numbers in range, an architecture that can exist."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"must be a JSON object (a config.json), not a {type(cfg).__name__}")
    check_numbers(cfg)
    try:
        arch, vocab = from_hf_config(cfg)
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as err:
        if isinstance(err, ConfigError):
            raise
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ConfigError(f"not a config this accounting can read ({what})") from None
    check_architecture(arch, vocab)
    return arch, vocab


def count_summary(a: Architecture, vocab_size: int) -> dict[str, Any]:
    """What `python -m stages.plan count` prints: published-style counts (with embeddings) and more."""
    return {
        "kind": a.kind,
        "total_params": a.total_params(vocab_size, "with_embeddings"),
        "active_params": a.active_params(vocab_size, "with_embeddings"),
        # DeepSeek-V2/V3 report activated params without the input embedding (a lookup, no compute);
        # the LM head (V x d) stays, also when it is tied to that embedding
        "active_params_no_input_embedding": a.nonvocab_active + vocab_size * a.d_model,
        "nonvocab_params": a.nonvocab_total,
        "nonvocab_active": a.nonvocab_active,
        "activation_rate": a.activation_rate,
        "flops_per_token": a.train_flops_per_token("exact", vocab_size),
        "flops_per_token_nonvocab": a.train_flops_per_token("nonvocab"),
        "flops_per_token_6n": a.train_flops_per_token("6n"),
        "seq_len": a.seq_len,
        "vocab_size": vocab_size,
        "count_embeddings": "with_embeddings",
        "flops_note": "training (fwd+bwd) matmul FLOPs per token at seq_len, LM head included",
    }


# ------------------------------------------------------------------------------------ the planner
AUDIT_TOLERANCE = 0.01  # a run whose measured N, N_active, tokens or FLOPs deviate from its plan by more
# than this fails the audit (moe_study/train/audit.py) and marks its study failed (stages/aggregate.py)


class PlanError(ValueError):
    """A run that cannot meet the budget with the model family (names the run and what to relax)."""


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def base_architecture(m: ModelConfig, kind: str, ffn_hidden: int) -> Architecture:
    """The model family's shared shape (everything but the FFN) with the given FFN width."""
    return Architecture(kind=kind, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, seq_len=m.seq_len,
                        ffn_hidden=ffn_hidden, tie_embeddings=m.tie_embeddings, n_kv_heads=m.n_kv_heads,
                        qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, first_dense_layers=m.first_dense_layers,
                        moe_every=m.moe_every)


def dense_width(m: ModelConfig, target_params: float, vocab: int = 0, conv: str = "nonvocab") -> int:
    """FFN width of the dense reference: model.ffn_hidden, or the width whose N is closest to the budget."""
    if m.ffn_hidden is not None:
        return m.ffn_hidden
    a0 = base_architecture(m, "dense", 0)
    shared = a0.total_params(vocab, conv)
    per_unit = m.n_layers * swiglu_params(m.d_model, 1)
    return _round_to((target_params - shared) / per_unit, m.multiple_of)


def solve_architecture(m: ModelConfig, run: RunConfig, target_params: float, name: str = "run",
                       planner: PlannerConfig | None = None, vocab_size: int = 0) -> Architecture:
    """The run's architecture: total params within budget.params_tol of N and, for MoE, the
    activation rate within budget.rate_tol (relative) of the target, searching the dims the run
    lets vary (runs.<name>.vary: experts, top_k, expert_width). Raises PlanError saying what to relax."""
    pl = planner or PlannerConfig()
    conv = pl.count_embeddings
    a0 = base_architecture(m, "dense", 0)
    shared = a0.total_params(vocab_size, conv)
    if target_params - shared <= 0:
        raise PlanError(
            f"runs.{name}: budget.params={target_params:.4g} is below the {shared} params that attention "
            f"and norms of the model family alone take (lower model.d_model / n_layers or raise the budget)"
        )
    f_dense = dense_width(m, target_params, vocab_size, conv)
    if run.kind == "dense":
        arch = base_architecture(m, "dense", f_dense)
        dev = arch.total_params(vocab_size, conv) / target_params - 1
        if abs(dev) > pl.params_tol:
            raise PlanError(
                f"runs.{name}: the dense model has N={arch.total_params(vocab_size, conv)} ({dev:+.2%} from "
                f"budget.params={target_params:.4g}), beyond budget.params_tol={pl.params_tol}: lower "
                f"model.multiple_of (FFN widths move in steps of {3 * m.d_model * m.n_layers * m.multiple_of} "
                f"params), unset model.ffn_hidden, or widen budget.params_tol")
        return arch
    if (run.design or pl.design) == "paper":
        return _solve_paper(m, run, target_params, name, pl, vocab_size, f_dense, shared)
    return _solve_moe(m, run, target_params, name, pl, vocab_size, f_dense, shared)


def paper_expert_width(m: ModelConfig, run: RunConfig, f_dense: int) -> int:
    """Design `paper`: the routed expert width, fixed across a sweep (runs.<name>.expert_width, else the
    dense FFN width / granularity, else d_model / 4, the paper's routed width), rounded to multiple_of."""
    if run.expert_width is not None:
        return run.expert_width
    goal = f_dense / run.granularity if run.granularity is not None else m.d_model / 4
    return _round_to(goal, m.multiple_of)


def _solve_paper(m: ModelConfig, run: RunConfig, target: float, name: str, pl: PlannerConfig, vocab: int,
                 f_dense: int, shared: int) -> Architecture:
    """arXiv 2506.12119's "1dense+SE" design: routed experts of a fixed width f_e, one shared expert of
    width K f_e, the first model.first_dense_layers layers dense (of the dense reference's width), and the
    activation rate reached by the expert count E and top-k K alone (N within params_tol, r_a within
    rate_tol; the shape closest to both targets)."""
    conv = pl.count_embeddings
    f_e = paper_expert_width(m, run, f_dense)
    probe = replace(base_architecture(m, "moe", f_e), dense_ffn_hidden=f_dense, experts=2, top_k=1)
    n_moe, n_dense = probe.moe_layers, probe.dense_layers
    if n_moe == 0:
        raise PlanError(f"runs.{name}: model.first_dense_layers / moe_every leave no MoE layer")
    d, rate = m.d_model, run.activation_rate
    fixed = shared + n_dense * swiglu_params(d, f_dense)
    unit = swiglu_params(d, f_e)
    best: tuple[float, int, int, int, int] | None = None
    near: dict[float, tuple[int, int]] = {}
    for k in range(1, pl.max_top_k + 1):
        for e in range(k + 1, pl.max_experts + 1):
            total = fixed + n_moe * (e * unit + k * unit + d * e)  # E routed + one shared of width K f_e
            active = fixed + n_moe * (2 * k * unit + d * e)
            p_err = abs(total / target - 1)
            if p_err <= pl.params_tol:
                near.setdefault(round(active / total, 3), (e, k))
            r_err = abs(active / total / rate - 1) if rate is not None else 0.0
            worst = max(p_err / pl.params_tol, r_err / pl.rate_tol)
            if best is None or worst < best[0]:
                best = (worst, e, k, total, active)
    assert best is not None
    worst, e, k, total, active = best
    arch = replace(probe, experts=e, top_k=k, shared_experts=1, shared_ffn_hidden=k * f_e,
                   dense_ffn_hidden=f_dense if n_dense else None)
    assert arch.total_params(vocab, conv) == total and arch.active_params(vocab, conv) == active
    if worst > 1:
        rates = sorted(near, key=lambda r: abs(r - (rate or 0)))[:4]
        hint = ", ".join(f"{r:.3f} (E={near[r][0]}, K={near[r][1]})" for r in sorted(rates))
        raise PlanError(
            f"runs.{name}: design paper (routed width {f_e}, one shared expert of K x {f_e}): no E, K within "
            f"±{pl.params_tol:.0%} of N={target:.4g} and ±{pl.rate_tol:.0%} of activation_rate={rate}; closest "
            f"E={e}, K={k}: N={total} ({total / target - 1:+.2%}), r_a={active / total:.4f}. Relax: raise "
            f"budget.max_top_k / max_experts, change runs.{name}.expert_width, widen budget.params_tol / rate_tol"
            + (f"; or pick a reachable activation_rate: {hint}" if hint else ""))
    return arch


def _solve_moe(m: ModelConfig, run: RunConfig, target: float, name: str, pl: PlannerConfig, vocab: int,
               f_dense: int, shared: int) -> Architecture:
    conv = pl.count_embeddings
    probe = replace(base_architecture(m, "moe", 1), dense_ffn_hidden=f_dense, experts=2, top_k=1)
    n_moe, n_dense = probe.moe_layers, probe.dense_layers
    if n_moe == 0:
        raise PlanError(f"runs.{name}: model.first_dense_layers / moe_every leave no MoE layer in "
                        f"{m.n_layers} layers")
    d = m.d_model
    fixed = shared + n_dense * swiglu_params(d, f_dense)  # every param outside the MoE FFNs
    rate = run.activation_rate
    if rate is not None and rate * target <= fixed:
        raise PlanError(
            f"runs.{name}.activation_rate={rate}: at budget.params={target:.4g} the attention, norms and "
            f"dense layers alone are {fixed / target:.3f} of N, so the rate must exceed that (or use fewer "
            f"model.first_dense_layers, fewer n_kv_heads, a narrower d_model)")
    vary = set(run.vary_dims())
    ks = range(1, pl.max_top_k + 1) if "top_k" in vary else [run.top_k]
    S = run.shared_experts
    gate = d if run.shared_gate and S else 0
    # granularity G (Krajewski et al. 2024): prefer the shape whose expert width is nearest f_dense / G
    width_goal = f_dense / run.granularity if run.granularity is not None else None
    best: tuple[tuple, tuple] | None = None
    if "experts" not in vary and run.experts is None:
        raise PlanError(f"runs.{name}: give experts or let them vary (runs.{name}.vary)")
    near_rates: dict[float, tuple] = {}
    for k in ks:
        es = range(max(k + 1, 2), pl.max_experts + 1) if "experts" in vary else [run.experts]
        for e in es:
            if k >= e:
                continue
            # params of one MoE layer: e * 3 d f_e + S * 3 d f_s + d e + gate
            fs_fixed = run.shared_expert_width
            unit = swiglu_params(d, 1) * (e + (S if fs_fixed is None else 0))
            rest = target - fixed - n_moe * (d * e + gate + (S * swiglu_params(d, fs_fixed) if fs_fixed else 0))
            exact = rest / (n_moe * unit)
            if exact < 1:
                continue
            if "expert_width" in vary:
                lo = max(m.multiple_of, math.floor(exact / m.multiple_of) * m.multiple_of)
                widths = sorted({lo, lo + m.multiple_of})
            else:  # fixed expert width: model.ffn_hidden / granularity, or the rounded goal
                widths = [_round_to(width_goal or exact, m.multiple_of)]
            for f in widths:
                fs = f if fs_fixed is None else fs_fixed
                per_total = e * swiglu_params(d, f) + S * swiglu_params(d, fs) + d * e + gate
                per_active = k * swiglu_params(d, f) + S * swiglu_params(d, fs) + d * e + gate
                total = fixed + n_moe * per_total
                active = fixed + n_moe * per_active
                p_err = abs(total / target - 1)
                r_err = abs(active / total / rate - 1) if rate is not None else 0.0
                if p_err <= pl.params_tol:
                    near_rates.setdefault(round(active / total, 3), (e, k, f))
                worst = max(p_err / pl.params_tol, r_err / pl.rate_tol)
                # feasible shapes first, then the expert width nearest the granularity's (or the
                # fewest routed experts per token), then the closest to the targets
                pref = abs(math.log(f / width_goal)) if width_goal else k
                key = (0, pref, worst) if worst <= 1 else (1, 0, worst)
                if best is None or key < best[0]:
                    best = (key, (e, k, f, total, active))
    if best is None:
        raise PlanError(f"runs.{name}: no MoE shape has a positive expert width at budget.params={target:.4g} "
                        f"(lower runs.{name}.experts / granularity or raise the budget)")
    e, k, f, total, active = best[1]
    arch = replace(probe, experts=e, top_k=k, ffn_hidden=f, shared_experts=S,
                   dense_ffn_hidden=f_dense if n_dense else None,
                   shared_ffn_hidden=run.shared_expert_width, shared_gate=run.shared_gate and S > 0)
    assert arch.total_params(vocab, conv) == total and arch.active_params(vocab, conv) == active
    p_dev = total / target - 1
    r_dev = active / total / rate - 1 if rate is not None else 0.0
    if abs(p_dev) > pl.params_tol or abs(r_dev) > pl.rate_tol:
        rates = sorted(near_rates, key=lambda r: abs(r - (rate or 0)))[:4]
        hint = ", ".join(f"{r:.3f} (E={near_rates[r][0]}, k={near_rates[r][1]})" for r in sorted(rates))
        relax = [f"add {d_} to runs.{name}.vary" for d_ in ("top_k", "experts", "expert_width") if d_ not in vary]
        relax += ["lower model.multiple_of", "widen budget.params_tol / rate_tol"]
        what = f"±{pl.params_tol:.0%} of N={target:.4g}"
        if rate is not None:
            what += f" and ±{pl.rate_tol:.0%} of activation_rate={rate}"
        raise PlanError(
            f"runs.{name}: no MoE shape within {what}; closest E={e}, k={k}, expert width {f}: N={total} "
            f"({p_dev:+.2%}), r_a={active / total:.4f} ({r_dev:+.2%}). Relax: {'; '.join(relax)}"
            + (f"; or pick a reachable activation_rate: {hint}" if hint and rate is not None else ""))
    return arch


@dataclass(frozen=True)
class RunPlan:
    run: str
    arch: Architecture
    tokens: int  # the run's training token budget T
    batch_size: int  # sequences per step
    steps: int
    unique_tokens: int
    compute: float
    compute_convention: str = "6n"
    vocab_size: int = 0  # the planning vocabulary (tokenizer.vocab_size); only "exact" FLOPs use it
    count_embeddings: str = "nonvocab"
    target_params: float = 0.0
    target_rate: float | None = None
    warnings: tuple[str, ...] = field(default=())
    size: str | None = None  # the budget.sizes name the run is planned at (None: the study's one size)
    compute_scale: float = 1.0  # compute = compute_scale x the budget's C


    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.arch.seq_len

    @property
    def epochs(self) -> float:
        """Passes over the unique stream the run is served (moe_study/data/replay.py)."""
        return unique_passes(self.tokens, self.unique_tokens, self.arch.seq_len)

    @property
    def reads_all_unique(self) -> bool:
        """Whether the run reads every sequence of one pass over U (the dense run must)."""
        return self.epochs >= 1.0

    @property
    def flops_per_token(self) -> float:
        return self.arch.train_flops_per_token(self.compute_convention, self.vocab_size)

    @property
    def train_flops_exact(self) -> float | None:
        """Every matmul (LM head and attention scores included) x the tokens the run reads."""
        return self.arch.train_flops_per_token("exact", self.vocab_size) * self.tokens if self.vocab_size else None

    @property
    def lm_head_flops_share(self) -> float | None:
        """The LM head's share (2 d V of the forward) of the run's exact training FLOPs per token."""
        if not self.vocab_size:
            return None
        return 2 * self.arch.d_model * self.vocab_size / self.arch.forward_flops(self.vocab_size)

    def to_dict(self) -> dict:
        a, v = self.arch, self.vocab_size
        fpt = {c: a.train_flops_per_token(c, v) for c in COMPUTE_CONVENTIONS if c != "exact" or v}
        return {
            "run": self.run,
            "arch": a.to_dict(),
            "nonvocab_params": a.nonvocab_total,
            "nonvocab_active": a.nonvocab_active,
            "activation_rate": a.activation_rate,
            "tokens": self.tokens,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "tokens_per_step": self.tokens_per_step,
            "unique_tokens": self.unique_tokens,
            "epochs": self.epochs,
            "reads_all_unique": self.reads_all_unique,
            "compute": self.compute,
            "compute_used": self.flops_per_token * self.tokens,
            "compute_convention": self.compute_convention,
            "flops_per_token": self.flops_per_token,
            "flops_per_token_6n": fpt["6n"],
            "flops_per_token_nonvocab": fpt["nonvocab"],
            "flops_per_token_exact": fpt.get("exact"),
            "train_flops_exact": self.train_flops_exact,
            "lm_head_flops_share": self.lm_head_flops_share,
            "vocab_size": v,
            "count_embeddings": self.count_embeddings,
            "total_params": a.total_params(v, "with_embeddings") if v else None,
            "active_params": a.active_params(v, "with_embeddings") if v else None,
            "target_params": self.target_params,
            "target_activation_rate": self.target_rate,
            "params_rel_dev": a.total_params(v, self.count_embeddings) / self.target_params - 1,
            "rate_rel_dev": (a.activation_rate / self.target_rate - 1) if self.target_rate else None,
            "warnings": list(self.warnings),
            # only when used, so that the plan.json of a one-size study at C is what it was before these options
            **({"size": self.size} if self.size is not None else {}),
            **({"compute_scale": self.compute_scale} if self.compute_scale != 1 else {}),
        }


def plan_run(p: Params, name: str) -> RunPlan:
    """Equal resources: the same N, C and U for every run; T_i = C / F_i, whole optimizer steps.

    A run with `size` is planned at that size's N, C and model dims (budget.sizes); a run's C is the
    budget's times its `compute_scale` (a dense run at 2C: the data-reuse reference)."""
    pl = p.budget
    vocab = p.tokenizer.vocab_size
    run = p.run(name)
    model, target_params, compute = p.run_size(name)
    arch = solve_architecture(model, run, target_params, name, pl, vocab)
    per_step = p.train.batch_size * arch.seq_len
    fpt = arch.train_flops_per_token(pl.compute_convention, vocab)
    steps = math.floor(compute / fpt / per_step)
    where = "budget.compute" if run.size is None else f"budget.sizes.{run.size}.compute"
    if run.compute_scale != 1:
        where += f" x runs.{name}.compute_scale"
    if steps < 1:
        raise PlanError(
            f"runs.{name}: {where}={compute:.4g} is below one optimizer step of this run "
            f"({fpt * per_step:.4g} FLOPs = {per_step} tokens x {fpt:.4g} FLOPs/token, "
            f"budget.compute_convention={pl.compute_convention}): raise {where} or lower train.batch_size")
    target_rate = run.activation_rate if run.kind == "moe" else None
    plan = RunPlan(run=name, arch=arch, tokens=steps * per_step, batch_size=p.train.batch_size, steps=steps,
                   unique_tokens=p.budget.unique_tokens, compute=compute,
                   compute_convention=pl.compute_convention, vocab_size=vocab,
                   count_embeddings=pl.count_embeddings, target_params=target_params, target_rate=target_rate,
                   size=run.size, compute_scale=run.compute_scale)
    if run.kind == "dense" and not plan.reads_all_unique:
        need = math.ceil(max(1, (p.budget.unique_tokens - 1) // arch.seq_len) * arch.seq_len / per_step)
        msg = (f"runs.{name}: the dense run reads {plan.epochs:.4f} of one pass over budget.unique_tokens="
               f"{p.budget.unique_tokens} ({steps} steps of {per_step} tokens); for it to read all of U raise "
               f"{where} to >= {need * per_step * fpt:.6g} ({need} steps x {per_step} tokens x {fpt:.6g} "
               f"FLOPs/token, budget.compute_convention={pl.compute_convention})")
        plan = _with_warning(plan, msg)
    share = plan.lm_head_flops_share
    if pl.compute_convention == "nonvocab" and share is not None and share > HEAD_SHARE_WARN:
        msg = (f"runs.{name}: the LM head is {share:.1%} of this run's exact training FLOPs (> "
               f"{HEAD_SHARE_WARN:.0%}), and budget.compute_convention=nonvocab does not count it: runs that "
               f"read more tokens get more real compute (compare train_flops_exact; use "
               f"compute_convention: exact to equalise it)")
        plan = _with_warning(plan, msg)
    return plan


def _with_warning(plan: RunPlan, msg: str) -> RunPlan:
    """Log a planning warning and keep it in the plan (plan.json `warnings`), where the table shows it."""
    log.warning("%s", msg)
    return replace(plan, warnings=(*plan.warnings, msg))


def exact_train_flops(plan: dict[str, Any], tokens: int) -> float:
    """A plan.json's exact training FLOPs (every matmul, LM head and attention scores included) for
    `tokens` tokens read: `train_flops_exact` of train.json and the `runs` table."""
    arch = Architecture(**plan["arch"])
    vocab = int(plan.get("vocab_size") or 0)
    if not vocab:
        raise ValueError("the plan has no vocab_size: its exact FLOPs are unknown (re-run the plan stage)")
    return arch.train_flops_per_token("exact", vocab) * tokens


def check_feasible(p: Params) -> None:
    """Raise PlanError for the first run the budget cannot plan (called before any compute)."""
    for name in p.runs:
        plan_run(p, name)
