"""The decoder LM of the study: dense SwiGLU or top-k routed MoE.

The architecture is fixed by moe_study/accounting.py (whose formulas the planner uses to equalise
non-vocabulary parameters N and compute C): pre-norm blocks of RMSNorm (weight only), causal
attention (q, k, v, o; GQA, optional q/k/v biases and q/k norms) with rotary positions (no
parameters), and a SwiGLU FFN, or an MoE layer of E SwiGLU experts behind a bias-free linear router
plus optional always-active shared experts; MoE models may keep their first layers (or all but
every n-th) dense. `count_nonvocab_params` counts the
real module so a test can prove it equals `Architecture.nonvocab_total / nonvocab_active`.

Where the parts live (torchtitan style: each part can be tested and swapped alone):
- layers.py: RMSNorm, rotary attention, the dense SwiGLU.
- router.py: `Router`, softmax or sigmoid over E logits, top-k, the top-k weights (renormalised
  only with router.normalize_topk),
  optional aux-loss-free bias; balancing.py: the Switch/GShard load-balancing loss
  E * sum_i f_i P_i, the router z-loss mean(logsumexp(logits)^2) and the bias step.
- moe.py: the `MoE` block, `GroupedExperts` (the E experts as stacked (E, d, 2f) / (E, f, d)
  weights) and `SharedExperts`.
- kernels/experts.py: dispatch (sort the (token, slot) pairs by expert), the grouped expert GEMMs
  (reference loop on CPU, one grouped kernel or the fused Triton block on GPU) and combine (the
  inverse permutation with the weighted sum over the k slots). Dropless: no token is ever dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_study.accounting import Architecture
from moe_study.config.schema import RouterConfig
from moe_study.hashing import verify_dir
from moe_study.model.layers import Attention, ModelConfigError, RMSNorm, SwiGLU
from moe_study.model.moe import MoE, MoEOutput, SharedExperts
from moe_study.model.router import Router

INIT_STD = 0.02


class Block(nn.Module):
    def __init__(self, a: Architecture, backend: str, layer: int = 0, router: RouterConfig | None = None) -> None:
        super().__init__()
        self.norm1 = RMSNorm(a.d_model)
        self.attn = Attention(a.d_model, a.n_heads, a.seq_len, a.n_kv_heads, a.head_dim, a.qkv_bias, a.qk_norm)
        self.norm2 = RMSNorm(a.d_model)
        moe = a.is_moe_layer(layer)
        self.ffn: nn.Module = (
            MoE(a.d_model, a.ffn_hidden, a.experts, a.top_k, backend, router) if moe
            else SwiGLU(a.d_model, a.dense_width)
        )
        self.shared = (SharedExperts(a.d_model, a.shared_width, a.shared_experts, a.shared_gate)
                       if moe and a.shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput | None]:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        out = self.ffn(h)
        if isinstance(out, MoEOutput):
            y = out.y if self.shared is None else out.y + self.shared(h)
            return x + y, out
        return x + out, None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, V), float32; None when the forward was given targets
    aux_loss: torch.Tensor  # mean over MoE layers (0 for dense)
    z_loss: torch.Tensor  # mean over MoE layers (0 for dense)
    load: torch.Tensor | None  # (layers, E) fraction of routed slots per expert, MoE only
    ce: torch.Tensor | None = None  # mean next-token cross-entropy, when the forward was given targets


class LM(nn.Module):
    def __init__(self, arch: Architecture, vocab_size: int, expert_backend: str = "auto",
                 router: RouterConfig | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.router_config = router or RouterConfig()
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, arch.d_model)
        self.blocks = nn.ModuleList(Block(arch, expert_backend, i, router) for i in range(arch.n_layers))
        self.norm = RMSNorm(arch.d_model)
        # Tied: the LM head is the embedding matrix (no extra module, so no shared-tensor aliasing)
        self.lm_head = None if arch.tie_embeddings else nn.Linear(arch.d_model, vocab_size, bias=False)
        self._compiled_head_loss: Any = None  # set by compile_head
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); output projections of residual branches scaled by 1/sqrt(2L)."""
        resid = INIT_STD / math.sqrt(2 * self.arch.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()  # q/k/v biases
            elif p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            elif name.endswith(("attn.o.weight", "ffn.w2.weight", "experts.w2", "shared.mlp.w2.weight")):
                p.normal_(0.0, resid)
            else:
                p.normal_(0.0, INIT_STD)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """Logits of `idx` (B, S); given `targets` (B, S), the mean cross-entropy `ce` instead of logits."""
        x = self.tok_emb(idx)
        moe: list[MoEOutput] = []
        for block in self.blocks:
            x, m = block(x)
            if m is not None:
                moe.append(m)
        if targets is None:
            logits, ce = self.head(x), None
        else:
            logits, ce = None, (self._compiled_head_loss or self.head_loss)(x, targets)
        zero = (logits if ce is None else ce).new_zeros(())
        if not moe:
            return ModelOutput(logits, zero, zero, None, ce)
        aux = torch.stack([m.aux_loss for m in moe]).mean()
        z = torch.stack([m.z_loss for m in moe]).mean()
        return ModelOutput(logits, aux, z, torch.stack([m.load for m in moe]), ce)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: float32 logits (B, S, V) of the last hidden states."""
        x = self.norm(x)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w).float()

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of `head(x)` against `targets` (B, S): the training loss.

        Eager, these are exactly the ops of `F.cross_entropy(model(idx).logits, ...)` (same bytes on
        CPU). Compiled (`compile_head`), Inductor fuses the float32 upcast into the log-softmax and its
        backward, so the (B*S, V) float32 logits and their gradient are never materialised.
        """
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def compile_head(self, mode: str | None = None) -> None:
        """Use a torch.compile'd `head_loss` in `forward(idx, targets)` (no parameter or state_dict change)."""
        self._compiled_head_loss = torch.compile(self.head_loss, mode=mode)

    def update_router_bias(self) -> None:
        """Aux-loss-free balancing step of every MoE router (RouterConfig.bias_balancing); call it once
        after each optimizer step. A no-op for dense models and routers without bias balancing."""
        for m in self.modules():
            if isinstance(m, Router):
                m.update_bias()

    def expert_backends(self) -> dict[str, str | None]:
        """Backend that ran in the last forward of each MoE layer, and the fallback reason if any."""
        out: dict[str, str | None] = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoE):
                out[f"layer{i}"] = block.ffn.experts.last_backend
                out[f"layer{i}.fallback"] = block.ffn.experts.last_fallback
        return out


# ------------------------------------------------------------------------------- build, count, load
ARCH_KEYS = tuple(f.name for f in fields(Architecture))


def architecture(arch: dict[str, Any]) -> Architecture:
    """Validate a plan's "arch" dict into an Architecture (unknown or missing keys are errors)."""
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ModelConfigError(f"arch has unknown key(s) {unknown}; expected {list(ARCH_KEYS)}")
    try:
        a = Architecture(**arch)
    except TypeError as err:
        raise ModelConfigError(f"arch is incomplete: {err}") from None
    if a.kind not in ("dense", "moe"):
        raise ModelConfigError(f"arch.kind={a.kind!r} must be 'dense' or 'moe'")
    for key in ("d_model", "n_layers", "n_heads", "seq_len", "ffn_hidden", "experts", "top_k", "moe_every",
                "n_kv_heads", "head_dim", "shared_ffn_hidden", "dense_ffn_hidden"):
        value = getattr(a, key)
        if value is not None and int(value) < 1:
            raise ModelConfigError(f"arch.{key}={value} must be positive")
    if a.head_dim is None and a.d_model % a.n_heads or a.head_size % 2:
        raise ModelConfigError(
            f"arch.d_model={a.d_model} / n_heads={a.n_heads} must give an even head size (rotary pairs)")
    if a.n_heads % a.kv_heads:
        raise ModelConfigError(f"arch.n_heads={a.n_heads} is not divisible by n_kv_heads={a.n_kv_heads}")
    if a.mla:
        raise ModelConfigError("arch.kv_lora_rank: multi-head latent attention is counted by moe_study/accounting.py "
                               "but not built by this model")
    if a.qk_norm not in ("none", "layer", "head"):
        raise ModelConfigError(f"arch.qk_norm={a.qk_norm!r} must be none, layer or head")
    if a.shared_experts < 0 or a.first_dense_layers < 0:
        raise ModelConfigError("arch.shared_experts and arch.first_dense_layers must be >= 0")
    if a.kind == "moe" and not 1 <= a.top_k < a.experts:
        raise ModelConfigError(f"arch.top_k={a.top_k} must be in [1, experts={a.experts})")
    if a.kind == "moe" and a.moe_layers == 0:
        raise ModelConfigError(f"arch.first_dense_layers={a.first_dense_layers} / moe_every={a.moe_every} leave "
                               f"no MoE layer in {a.n_layers} layers")
    return a


def router_config(router: RouterConfig | dict[str, Any] | None) -> RouterConfig | None:
    """A RouterConfig from the params section, its dict form (config.json), or None (the default)."""
    if router is None or isinstance(router, RouterConfig):
        return router
    if "normalize_topk" not in router:  # saved before the option existed: those routers renormalised
        router = {**router, "normalize_topk": True}
    try:
        return RouterConfig(**router)
    except Exception as err:
        raise ModelConfigError(f"bad router config {router!r}: {err}") from None


def build_model(arch: dict[str, Any] | Architecture, vocab_size: int, expert_backend: str = "auto",
                router: RouterConfig | dict[str, Any] | None = None) -> LM:
    """The LM of a plan's "arch" dict (keys of accounting.Architecture) and the tokenizer's vocab.

    `router` (params.yaml `router:`; None = softmax top-k) only matters for MoE archs. Save it in
    the checkpoint's config.json under "router" so `load_model` rebuilds the same routing.
    """
    a = arch if isinstance(arch, Architecture) else architecture(arch)
    if vocab_size < 2:
        raise ModelConfigError(f"vocab_size={vocab_size} must be at least 2")
    return LM(a, int(vocab_size), expert_backend, router_config(router))


def count_nonvocab_params(model: LM) -> tuple[int, int]:
    """(total, active) non-vocabulary parameters of the real module.

    Total: every parameter except the token embedding and an untied LM head. Active: the same,
    but each MoE layer's experts count k/E of their parameters (a token uses k of E experts).
    """
    vocab = {id(model.tok_emb.weight)} | ({id(model.lm_head.weight)} if model.lm_head is not None else set())
    total = sum(p.numel() for p in model.parameters() if id(p) not in vocab)
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            expert_params = sum(p.numel() for p in m.experts.parameters())
            inactive += expert_params * (m.experts_n - m.top_k) // m.experts_n
    return total, total - inactive


MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def state_dict_for_save(model: LM) -> dict[str, torch.Tensor]:
    """Contiguous CPU float tensors in a fixed key order (so identical weights give identical bytes)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in sorted(model.state_dict().items())}


def save_model(model: LM, directory: Path, config: dict[str, Any]) -> None:
    """Write model.safetensors and config.json into `directory` (the caller makes it atomic).

    config.json always records the router config the model routes with (the caller's "router", else the
    model's own): a file without it is read as a run that predates `normalize_topk` (renormalised)."""
    from safetensors.torch import save_file

    if model.arch.kind == "moe" and "router" not in config:
        config = {**config, "router": model.router_config.model_dump()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_save(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def load_model(directory: Path | str, expert_backend: str = "auto",
               device: str | torch.device = "cpu") -> tuple[LM, dict[str, Any]]:
    """Rebuild the model from config.json and load its weights (strict: every key must match)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_FILE, directory / MODEL_FILE
    if not cfg_path.exists() or not weights.exists():
        raise FileNotFoundError(f"{directory}: needs {CONFIG_FILE} and {MODEL_FILE} (run the train stage)")
    verify_dir(directory)  # manifest.json (written by the train stage): no flipped byte is scored
    config = json.loads(cfg_path.read_text())
    for key in ("arch", "vocab_size"):
        if key not in config:
            raise ModelConfigError(f"{cfg_path}: missing key {key!r}")
    # a config.json without "router" predates the option: softmax top-k, renormalised (router_config)
    model = build_model(config["arch"], config["vocab_size"], expert_backend, config.get("router", {}))
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelConfigError(f"{weights}: weights do not match config.json (missing {missing}, "
                               f"unexpected {unexpected})")
    return model.to(device), config
