"""The model: parameter counts equal the accounting formulas, causality, MoE routing maths, I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.experts import combine, dispatch
from moe_study.accounting import Architecture, plan_run
from moe_study.config.load import load_params
from moe_study.config.schema import RouterConfig
from moe_study.model.layers import ModelConfigError
from moe_study.model.lm import LM, build_model, count_nonvocab_params, load_model, save_model
from moe_study.model.moe import MoE
from moe_study.model.router import Router

ROOT = Path(__file__).resolve().parent.parent
V = 97

ARCHS = {
    "dense": Architecture(kind="dense", d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=88),
    "dense_untied": Architecture(kind="dense", d_model=24, n_layers=3, n_heads=2, seq_len=8, ffn_hidden=40,
                                 tie_embeddings=False),
    "moe_e4k1": Architecture(kind="moe", d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=24,
                             experts=4, top_k=1),
    "moe_e8k2": Architecture(kind="moe", d_model=16, n_layers=3, n_heads=2, seq_len=16, ffn_hidden=8,
                             experts=8, top_k=2),
    "moe_e18k2_untied": Architecture(kind="moe", d_model=32, n_layers=1, n_heads=2, seq_len=16, ffn_hidden=16,
                                     experts=18, top_k=2, tie_embeddings=False),
    # the structural options, alone and together (each must count exactly like the accounting)
    "dense_gqa_bias": Architecture(kind="dense", d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=40,
                                   n_kv_heads=2, qkv_bias=True),
    "dense_qk_layer": Architecture(kind="dense", d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=40,
                                   n_kv_heads=1, qk_norm="layer"),
    "dense_qk_head_hd": Architecture(kind="dense", d_model=24, n_layers=1, n_heads=4, seq_len=16, ffn_hidden=40,
                                     head_dim=8, qk_norm="head"),
    "moe_shared_gate": Architecture(kind="moe", d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=8,
                                    experts=6, top_k=2, shared_experts=2, shared_gate=True),
    "moe_shared_wide": Architecture(kind="moe", d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=8,
                                    experts=6, top_k=2, shared_experts=1, shared_ffn_hidden=40),
    "moe_first_dense": Architecture(kind="moe", d_model=16, n_layers=3, n_heads=2, seq_len=16, ffn_hidden=8,
                                    experts=4, top_k=1, first_dense_layers=1, dense_ffn_hidden=48),
    "moe_every2_all": Architecture(kind="moe", d_model=32, n_layers=4, n_heads=4, seq_len=16, ffn_hidden=8,
                                   experts=5, top_k=2, moe_every=2, dense_ffn_hidden=40, n_kv_heads=2,
                                   qkv_bias=True, qk_norm="layer", shared_experts=1, shared_gate=True,
                                   tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_param_counts_equal_accounting(name: str) -> None:
    a = ARCHS[name]
    model = build_model(a.to_dict(), V)
    assert count_nonvocab_params(model) == (a.nonvocab_total, a.nonvocab_active)
    vocab = V * a.d_model * (1 if a.tie_embeddings else 2)
    assert sum(p.numel() for p in model.parameters()) == a.nonvocab_total + vocab


def test_param_counts_of_the_default_study() -> None:
    p = load_params(ROOT / "params.yaml")
    for run in p.runs:
        a = plan_run(p, run).arch
        assert count_nonvocab_params(build_model(a.to_dict(), 2048)) == (a.nonvocab_total, a.nonvocab_active)


def test_structure_of_the_options() -> None:
    m = build_model(ARCHS["moe_every2_all"].to_dict(), V)
    kinds = [type(b.ffn).__name__ for b in m.blocks]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    assert [b.shared is not None for b in m.blocks] == [False, True, False, True]
    assert m.blocks[0].ffn.w1.out_features == 40 and m.blocks[1].ffn.experts.w1.shape == (5, 32, 8)
    attn = m.blocks[0].attn
    assert attn.k.out_features == 2 * 8 and attn.q.bias is not None and attn.o.bias is None
    assert float(attn.q.bias.detach().abs().sum()) == 0  # biases start at zero
    first = build_model(ARCHS["moe_first_dense"].to_dict(), V)
    assert [type(b.ffn).__name__ for b in first.blocks] == ["SwiGLU", "MoE", "MoE"]


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    """A GQA layer is the MHA layer whose k/v heads are copies: same outputs from copied weights."""
    from moe_study.model.layers import Attention

    torch.manual_seed(5)
    gqa = Attention(16, 4, 8, n_kv_heads=2)
    mha = Attention(16, 4, 8)
    with torch.no_grad():
        mha.q.weight.copy_(gqa.q.weight)
        mha.o.weight.copy_(gqa.o.weight)
        for name in ("k", "v"):
            w = getattr(gqa, name).weight.view(2, 4, 16)  # (kv heads, head dim, d)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(16, 16))
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(gqa(x), mha(x))


def test_shared_experts_are_added_to_the_routed_output() -> None:
    torch.manual_seed(6)
    a = ARCHS["moe_shared_gate"]
    m = build_model(a.to_dict(), V)
    block = m.blocks[0]
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        h = block.norm2(x + block.attn(block.norm1(x)))
        routed = block.ffn(h).y
        gate = torch.sigmoid(h @ block.shared.gate.weight.T)
        want = x + block.attn(block.norm1(x)) + routed + gate * block.shared.mlp(h)
        torch.testing.assert_close(block(x)[0], want)


@pytest.mark.parametrize("name", ["dense", "moe_e8k2", "moe_every2_all"])
def test_causal(name: str) -> None:
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    torch.manual_seed(0)
    model = build_model(ARCHS[name].to_dict(), V).eval()
    idx = torch.randint(0, V, (2, 16))
    t = 9
    other = idx.clone()
    other[:, t + 1:] = torch.randint(0, V, (2, 16 - t - 1))
    with torch.no_grad():
        a, b = model(idx).logits, model(other).logits
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3  # and the future does change


def test_rotary_attention_depends_on_relative_position() -> None:
    """A sequence shifted right by padding gives the same outputs at the shifted positions when
    attention is restricted to the same tokens (RoPE: scores depend on offsets only)."""
    from moe_study.model.layers import apply_rotary, rotary_tables

    cos, sin = rotary_tables(12, 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(9, 6))
    assert not torch.allclose(score(5, 2), score(5, 4))


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax, top-k, renormalise (when the router does), run each chosen expert as a plain
    SwiGLU."""
    out = torch.zeros_like(x)
    e = moe.experts
    for t in range(x.shape[0]):
        p = (x[t] @ moe.router.gate.weight.T).softmax(-1)
        w, i = p.topk(moe.top_k)
        if moe.router.normalize_topk:
            w = w / w.sum()
        for wj, ij in zip(w, i, strict=True):
            h = F.silu(x[t] @ e.w1[ij]) * (x[t] @ e.w3[ij])
            out[t] += wj * (h @ e.w2[ij])
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("experts, top_k", [(4, 1), (6, 2), (5, 3)])
def test_moe_equals_naive_per_token_loop(experts: int, top_k: int, normalize: bool) -> None:
    torch.manual_seed(1)
    moe = MoE(d=8, f=12, experts=experts, top_k=top_k, router=RouterConfig(normalize_topk=normalize)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    out = moe(x)
    torch.testing.assert_close(out.y.view(-1, 8), naive_moe(moe, x.view(-1, 8)))
    assert abs(float(out.load.sum()) - 1) < 1e-12


def test_dispatch_groups_rows_by_expert_and_combine_inverts() -> None:
    torch.manual_seed(2)
    T, k, E, d = 11, 2, 5, 3
    x = torch.randn(T, d, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    x_perm, disp = dispatch(x, idx, E)
    assert disp.offs.dtype == torch.int32 and int(disp.offs[-1]) == T * k
    assert disp.counts.tolist() == torch.bincount(idx.reshape(-1), minlength=E).tolist()
    starts = [0, *disp.offs.tolist()[:-1]]
    for e, (s, end) in enumerate(zip(starts, disp.offs.tolist(), strict=True)):
        tokens = (disp.order[s:end] // k).tolist()
        assert tokens == sorted(tokens)  # stable: token order kept inside an expert
        assert all(e in idx[t].tolist() for t in tokens)
        torch.testing.assert_close(x_perm[s:end], x[tokens])
    weights = torch.rand(T, k, dtype=torch.float64)
    y = combine(x_perm, disp, weights)  # identity experts: y_t = x_t * sum_j w_tj
    torch.testing.assert_close(y, x * weights.sum(1, keepdim=True))


def test_router_losses() -> None:
    r = Router(d=4, experts=4, top_k=1)
    torch.nn.init.zeros_(r.gate.weight)  # uniform probabilities: aux = E * sum (f_i * 1/E) = 1
    x = torch.randn(8, 4)
    out = r(x)
    assert float(out.aux_loss.detach()) == pytest.approx(1.0)
    assert float(out.z_loss.detach()) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    torch.testing.assert_close(out.weights, torch.full((8, 1), 0.25))  # the raw top-1 probability (paper's gate)
    # all tokens to expert 0 with probability ~1: aux -> E * 1 * 1 = E
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 100.0
    out = r(torch.ones(8, 4))
    assert float(out.aux_loss.detach()) == pytest.approx(4.0, rel=1e-4)
    assert out.load.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_aux_loss_trains_the_routers_not_the_last_experts() -> None:
    """The balancing loss reaches every router (and, through the residual stream, earlier layers),
    but never the last layer's experts, which no router reads."""
    torch.manual_seed(3)
    model = build_model(ARCHS["moe_e4k1"].to_dict(), V)
    out = model(torch.randint(0, V, (2, 16)))
    out.aux_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for layer in (0, 1):
        assert grads[f"blocks.{layer}.ffn.router.gate.weight"].abs().sum() > 0
    last = grads["blocks.1.ffn.experts.w13"]
    assert last is None or last.abs().sum() == 0


def test_tied_embeddings_have_no_separate_head() -> None:
    m = build_model(ARCHS["dense"].to_dict(), V)
    assert m.lm_head is None and "lm_head.weight" not in m.state_dict()
    u = build_model(ARCHS["dense_untied"].to_dict(), V)
    assert u.lm_head is not None and u.lm_head.weight is not u.tok_emb.weight


@pytest.mark.parametrize(
    "change, match",
    [
        ({"bogus": 1}, "unknown key"),
        ({"n_heads": 3}, "head size"),
        ({"kind": "mlp"}, "kind"),
        ({"kind": "moe", "experts": 4, "top_k": 4}, "top_k"),
    ],
)
def test_bad_arch_is_a_clear_error(change: dict, match: str) -> None:
    arch = ARCHS["dense"].to_dict() | change
    with pytest.raises(ModelConfigError, match=match):
        build_model(arch, V)


def test_missing_arch_key_is_a_clear_error() -> None:
    arch = ARCHS["dense"].to_dict()
    del arch["ffn_hidden"]
    with pytest.raises(ModelConfigError, match="ffn_hidden"):
        build_model(arch, V)


@pytest.mark.parametrize("name", ["dense_untied", "moe_e8k2"])
def test_save_load_roundtrip(tmp_path: Path, name: str) -> None:
    torch.manual_seed(4)
    model = build_model(ARCHS[name].to_dict(), V).eval()
    save_model(model, tmp_path / "m", {"arch": ARCHS[name].to_dict(), "vocab_size": V})
    loaded, cfg = load_model(tmp_path / "m")
    assert isinstance(loaded, LM) and cfg["vocab_size"] == V
    idx = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_load_rejects_mismatched_weights(tmp_path: Path) -> None:
    model = build_model(ARCHS["dense"].to_dict(), V)
    save_model(model, tmp_path / "m", {"arch": ARCHS["dense"].to_dict() | {"ffn_hidden": 96}, "vocab_size": V})
    with pytest.raises((ModelConfigError, RuntimeError)):
        load_model(tmp_path / "m")


def test_sequence_longer_than_seq_len_is_an_error() -> None:
    model = build_model(ARCHS["dense"].to_dict(), V)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _cpu_compiler() -> str | None:
    """The C++ compiler Inductor would use on CPU, or None (then torch.compile cannot run here)."""
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception:
        return None


def _loss_and_grads(model: LM, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(idx, targets)
    (out.ce + 0.01 * out.aux_loss).backward()
    return out.ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["dense", "moe_e18k2_untied"])
def test_forward_with_targets_is_the_cross_entropy_of_the_logits(name: str) -> None:
    """The training path (model computes its loss) gives the same bytes as the loss of the returned logits."""
    torch.manual_seed(0)
    m = build_model(ARCHS[name].to_dict(), V)
    idx = torch.randint(0, V, (3, ARCHS[name].seq_len + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    ce, grads = _loss_and_grads(m, x, y)
    m.zero_grad(set_to_none=True)
    out = m(x)
    ref = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    (ref + 0.01 * out.aux_loss).backward()
    assert out.ce is None and m(x, y).logits is None
    assert torch.equal(ce, ref.detach())
    assert grads.keys() == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[n], p.grad), n


@pytest.mark.skipif(_cpu_compiler() is None, reason="torch.compile needs a C++ compiler on CPU")
@pytest.mark.parametrize("name", ["dense", "dense_untied"])
def test_compiled_head_loss_equals_eager(name: str) -> None:
    """compile_head (train.compile) changes how the loss is computed, not its value or its gradients."""
    torch.manual_seed(0)
    m = build_model(ARCHS[name].to_dict(), V)
    idx = torch.randint(0, V, (2, ARCHS[name].seq_len + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    ce, grads = _loss_and_grads(m, x, y)
    from torch._dynamo.utils import counters

    counters.clear()
    m.compile_head()
    ce_c, grads_c = _loss_and_grads(m, x, y)
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["ok"] == 1  # really compiled
    torch.testing.assert_close(ce_c, ce, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert m(x).logits is not None  # evaluation keeps its eager logits
