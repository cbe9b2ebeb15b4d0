"""MoE routing options (sigmoid scores, aux-loss-free bias balancing), the permutation gradients of
dispatch/combine, router config plumbing, and (on a GPU) the MoE layer equal across backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.experts import combine, dispatch, expert_forward
from moe_study.accounting import Architecture
from moe_study.config.schema import RouterConfig
from moe_study.model.layers import ModelConfigError
from moe_study.model.lm import build_model, load_model, save_model
from moe_study.model.moe import MoE
from moe_study.model.router import Router


def test_dispatch_combine_gradients_match_plain_indexing() -> None:
    """The gather-only backward of dispatch/combine equals autograd through plain indexing."""
    torch.manual_seed(0)
    T, k, E, d = 13, 3, 5, 4
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    scale = torch.randn(T * k, d, dtype=torch.float64)  # a non-trivial "expert": y_perm = x_perm * scale
    x_perm, disp = dispatch(x, idx, E)
    y = combine(x_perm * scale, disp, w)
    g = torch.randn(T, d, dtype=torch.float64)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    # plain maths: slot (t, j) sits at permuted row inverse[t*k + j]
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rows = scale[disp.inverse].view(T, k, d) * x2.unsqueeze(1)
    y2 = (rows * w2.unsqueeze(-1)).sum(1)
    dx2, dw2 = torch.autograd.grad(y2, (x2, w2), g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(dx, dx2)
    torch.testing.assert_close(dw, dw2)
    assert torch.equal(disp.order[disp.inverse], torch.arange(T * k))


def test_swiglu_matches_eager_autograd() -> None:
    from kernels.swiglu import swiglu

    h13 = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 5, dtype=torch.float64)
    y = swiglu(h13, 5)
    (dh,) = torch.autograd.grad(y, h13, g)
    h2 = h13.detach().clone().requires_grad_()
    y2 = F.silu(h2[:, :5]) * h2[:, 5:]
    (dh2,) = torch.autograd.grad(y2, h2, g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(dh, dh2)
    assert torch.autograd.gradcheck(lambda t: swiglu(t, 5), (h13,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_swiglu_kernel_matches_eager() -> None:
    from kernels.swiglu import swiglu

    h13 = torch.randn(1037, 2 * 136, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1037, 136, device="cuda", dtype=torch.bfloat16)
    y = swiglu(h13, 136)
    (dh,) = torch.autograd.grad(y, h13, g)
    h2 = h13.detach().float().requires_grad_()
    y2 = F.silu(h2[:, :136]) * h2[:, 136:]
    (dh2,) = torch.autograd.grad(y2, h2, g.float())
    assert float((y.float() - y2).norm() / y2.norm()) < 1e-2
    assert float((dh.float() - dh2).norm() / dh2.norm()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_permute_kernels_match_eager(dtype: torch.dtype) -> None:
    """The Triton dispatch/combine (forward and backward) against the eager maths on the CPU."""
    torch.manual_seed(6)
    T, k, E, d = 777, 3, 10, 200  # d not a power of two
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    x = torch.randn(T, d, dtype=dtype)
    w = torch.rand(T, k)
    g = torch.randn(T, d, dtype=dtype)
    scale = torch.randn(T * k, d, dtype=dtype)
    out = {}
    for dev in ("cpu", "cuda"):
        xd, wd = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
        x_perm, disp = dispatch(xd, idx.to(dev), E)
        y = combine(x_perm * scale.to(dev), disp, wd)
        out[dev] = [y, *torch.autograd.grad(y, (xd, wd), g.to(dev))]
    for name, a, b in zip(("y", "dx", "dw"), out["cuda"], out["cpu"], strict=True):
        err = float((a.cpu().float() - b.float()).norm() / b.float().norm())
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), f"{name}: {err:.3g}"


@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_router_weights_are_sigmoids_renormalised_on_request(normalize: bool) -> None:
    torch.manual_seed(1)
    r = Router(d=6, experts=8, top_k=3, router=RouterConfig(score="sigmoid", normalize_topk=normalize))
    x = torch.randn(10, 6)
    out = r(x)
    s = (x @ r.gate.weight.T).sigmoid()
    top, idx = s.topk(3, dim=-1)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.weights, top / top.sum(-1, keepdim=True) if normalize else top)
    assert out.aux_loss.requires_grad and float(out.aux_loss.detach()) > 0


def test_bias_steers_selection_but_not_weights() -> None:
    torch.manual_seed(2)
    r = Router(d=4, experts=4, top_k=1, router=RouterConfig(score="sigmoid", bias_balancing=True,
                                                             normalize_topk=True))
    x = torch.randn(16, 4)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))  # expert 2 wins every selection
    out = r(x)
    assert (out.indices == 2).all()
    torch.testing.assert_close(out.weights, torch.ones(16, 1))  # renormalised unbiased score of expert 2
    assert "expert_bias" in r.state_dict() and "pending_load" not in r.state_dict()
    r = r.to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.bfloat16 and r.expert_bias.dtype == torch.float32


def test_update_bias_moves_towards_balance() -> None:
    """sign(mean - load) * rate: overloaded experts go down, idle ones up; counts reset after."""
    torch.manual_seed(3)
    r = Router(d=4, experts=4, top_k=1, router=RouterConfig(bias_balancing=True, bias_update_rate=0.5))
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 5.0  # expert 0 takes every token with x[:, 0] > 0
    x = torch.ones(8, 4)
    r.train()
    r(x)
    load = r.pending_load.clone()
    assert load.tolist() == [8.0, 0.0, 0.0, 0.0]
    r.update_bias()
    assert r.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert r.pending_load.sum() == 0
    r.update_bias()  # nothing routed since: no change
    assert r.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    r.eval()
    r(x)
    assert r.pending_load.sum() == 0  # evaluation does not count towards balancing


def test_bias_balancing_evens_out_a_skewed_router() -> None:
    """Repeated updates spread tokens that a fixed, skewed gate would send to one expert."""
    torch.manual_seed(4)
    E = 4
    r = Router(d=8, experts=E, top_k=1, router=RouterConfig(score="sigmoid", bias_balancing=True,
                                                              bias_update_rate=0.05))
    with torch.no_grad():
        r.gate.weight.normal_(0, 0.3)
        r.gate.weight[0] += 1.0
    x = torch.randn(512, 8).abs()
    before = r(x).load.max().item()
    r.train()
    for _ in range(200):
        r(x)
        r.update_bias()
    after = r(x).load.max().item()
    assert before > 0.6 and after < 0.4


def test_build_model_takes_router_config_and_load_restores_it(tmp_path) -> None:
    arch = Architecture(kind="moe", d_model=16, n_layers=1, n_heads=2, seq_len=8, ffn_hidden=8, experts=4, top_k=2)
    cfg = RouterConfig(score="sigmoid", bias_balancing=True)
    m = build_model(arch.to_dict(), 50, router=cfg.model_dump())
    assert m.blocks[0].ffn.router.score == "sigmoid"
    with torch.no_grad():
        m.blocks[0].ffn.router.expert_bias.fill_(0.25)
    m.update_router_bias()  # nothing counted yet: unchanged
    save_model(m, tmp_path, {"arch": arch.to_dict(), "vocab_size": 50, "router": cfg.model_dump()})
    m2, _ = load_model(tmp_path)
    assert m2.blocks[0].ffn.router.expert_bias.tolist() == [0.25] * 4
    idx = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(m2(idx).logits, m(idx).logits)
    with pytest.raises(ModelConfigError, match="router"):
        build_model(arch.to_dict(), 50, router={"score": "relu"})
    dense = build_model(Architecture(kind="dense", d_model=16, n_layers=1, n_heads=2, seq_len=8,
                                     ffn_hidden=8).to_dict(), 50, router=cfg)
    dense.update_router_bias()  # no routers: a no-op


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gpu_moe_layer_equal_across_backends(score: str) -> None:
    """Same weights, same bf16 input: every grouped backend gives the MoE layer output and the
    gradients of the reference loop (up to bf16 rounding)."""
    from kernels import backend_status

    status = backend_status("cuda", torch.bfloat16)
    T, d, f, E, k = 1000, 256, 136, 16, 4
    torch.manual_seed(5)
    base = MoE(d, f, E, k, backend="reference", router=RouterConfig(score=score)).cuda()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    base = base.to(torch.bfloat16)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    results = {}
    for b in ("reference", "torch_grouped", "cutlass"):
        if status[b] is not None:
            continue
        base.experts.backend = b
        xb = x.clone().requires_grad_()
        y = base(xb).y
        assert base.experts.last_backend == b
        grads = torch.autograd.grad(y, [xb, base.experts.w13, base.experts.w2], g)
        results[b] = [y.float(), *(t.float() for t in grads)]
    assert "reference" in results and len(results) >= 2, f"no fused backend ran: {status}"
    ref = results.pop("reference")
    for b, got in results.items():
        for name, a, r in zip(("y", "dx", "dw13", "dw2"), got, ref, strict=True):
            err = float((a - r).norm() / r.norm())
            assert err < 1e-2, f"{b} {name}: relative error {err:.3g}"


def test_swiglu_reference_still_dense_maths() -> None:
    """Guard the naming the GPU test relies on: experts w1/w3 (d, f) and w2 (f, d) per expert."""
    moe = MoE(8, 12, 4, 2)
    x = torch.randn(5, 8)
    e = moe.experts
    h = F.silu(x @ e.w1[0]) * (x @ e.w3[0]) @ e.w2[0]
    assert h.shape == (5, 8)


def test_expert_facade_takes_plain_values_and_reports_what_ran() -> None:
    """kernels.experts.expert_forward: y = sum_j w_tj expert_{i_tj}(x_t), the backend that ran, and the
    reason a request fell back ("fused" on a CPU without Triton's interpreter)."""
    torch.manual_seed(4)
    T, k, E, d, f = 9, 2, 5, 6, 4
    x = torch.randn(T, d, dtype=torch.float64)
    w13 = torch.randn(E, d, 2 * f, dtype=torch.float64)
    w2 = torch.randn(E, f, d, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k, dtype=torch.float64)
    res = expert_forward(x, w, idx, None, w13, w2, "reference")
    want = torch.stack([sum(w[t, j] * (F.silu(x[t] @ w13[e, :, :f]) * (x[t] @ w13[e, :, f:])) @ w2[e]
                            for j, e in enumerate(idx[t].tolist())) for t in range(T)])
    torch.testing.assert_close(res.y, want)
    assert (res.backend_used, res.fallback_reason) == ("reference", None)
    if os.environ.get("TRITON_INTERPRET") != "1":
        fb = expert_forward(x, w, idx, None, w13, w2, "fused")
        assert torch.equal(fb.y, res.y) and "fused" in (fb.fallback_reason or "")
    with pytest.raises(ValueError, match="expert backend 'fast'"):
        expert_forward(x, w, idx, None, w13, w2, "fast")


def test_kernels_do_not_import_the_library() -> None:
    """The import direction is stages -> moe_study -> kernels: the expert facade and the fused router
    load neither moe_study nor stages (they take plain values, never a config object)."""
    code = ("import sys, kernels, kernels.experts, kernels.router\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('moe_study', 'stages')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
