"""The fused Triton router (kernels/router.py) against the eager Router maths, and route() on narrow keys.

- CPU, in-process: the eager Router and route() give the same bytes as the code before the fused
  router existed (reproduced here), and the hand-derived backward (`backward_reference`, the maths of
  the backward kernel) equals autograd through the eager Router in float64.
- CPU, Triton's interpreter (subprocess, fp32): the kernels against Router's eager path, forward and
  the gradient of each loss term (weights, aux, z) w.r.t. the logits, over softmax/sigmoid, bias on/off,
  k=1, E not a power of two, tokens not a multiple of the block; ties go to the lowest expert id; the
  launch-error fallback.
- GPU (skipped without CUDA): bf16 logits at the benchmark shape and a ragged one, against the eager
  maths with a tie rule made explicit (ties -> lowest id, as the kernel does).
- router.normalize_topk (issue 14): off (the paper's gate, the default), the language-model loss alone
  reaches every router's gate weight in top-1 and top-k models, on the eager path (CPU), the fused path
  (interpreter) and on a GPU; on, a top-1 router gets no LM-loss gradient (the defect it fixes).
"""

from __future__ import annotations

import pytest
import torch
from test_moe_fused import HAVE_TRITON, run_interpreted

from kernels import router as fused
from kernels.experts import expert_counts, route
from moe_study.config.schema import RouterConfig
from moe_study.model.moe import MoE
from moe_study.model.router import Router

CUDA = torch.cuda.is_available()


def old_router(r: Router, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Router.forward as it was before kernels/router.py (commit e64d66c), for the byte-identity test."""
    logits = r.gate(x)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if r.score == "softmax":
        scores = logits.softmax(dim=-1)
        importance = scores.mean(dim=0)
    else:
        scores = logits.sigmoid()
        importance = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
    if not r.bias_balancing:
        top_w, top_i = scores.topk(r.top_k, dim=-1)
    else:
        top_i = (scores.detach() + r.expert_bias).topk(r.top_k, dim=-1).indices
        top_w = scores.gather(-1, top_i)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    counts = expert_counts(top_i, r.experts).to(scores.dtype)
    load = counts / counts.sum()
    aux = r.experts * (load * importance).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return top_w, top_i, aux, z, load


def stable_router(logits: torch.Tensor, k: int, score: str, bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The eager Router maths with ties made explicit: top-k by a stable descending sort (ties -> the
    lowest expert id, the kernel's rule). Returns (weights, indices, counts, load, aux, z)."""
    x = logits.float()
    E = x.shape[1]
    if score == "softmax":
        p = x.softmax(-1)
        importance = p.mean(0)
    else:
        p = x.sigmoid()
        importance = (p / p.sum(-1, keepdim=True)).mean(0)
    sel = p.detach() + (bias if bias is not None else 0.0)
    idx = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    w = p.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True)
    counts = expert_counts(idx, E)
    load = counts.float() / counts.sum()
    aux = E * (load * importance).sum()
    z = torch.logsumexp(x, dim=-1).pow(2).mean()
    return w, idx, counts, load, aux, z


@pytest.mark.parametrize("score,bias", [("softmax", False), ("sigmoid", True), ("softmax", True)])
def test_cpu_router_bytes_unchanged(score: str, bias: bool) -> None:
    """CPU runs the eager router: its outputs are the same bytes as before, and it reports the counts."""
    torch.manual_seed(11)
    r = Router(16, 10, 3, RouterConfig(score=score, bias_balancing=bias, normalize_topk=True))
    torch.nn.init.normal_(r.gate.weight, std=0.3)
    if bias:
        r.expert_bias.copy_(torch.randn(10) * 0.05)
    x = torch.randn(57, 16)
    out = r(x)
    assert r.last_path == "eager"
    new = (out.weights, out.indices, out.aux_loss, out.z_loss, out.load)
    for name, a, b in zip(("weights", "indices", "aux", "z", "load"), new, old_router(r, x), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(out.counts, expert_counts(out.indices, 10))


def test_route_narrow_keys_and_given_counts_match_int64_sort() -> None:
    torch.manual_seed(12)
    for E, T, k in ((64, 300, 8), (300, 200, 4), (7, 50, 1)):
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
        d = route(idx, E)
        order = torch.argsort(idx.reshape(-1), stable=True)  # the int64 sort route() ran before
        assert torch.equal(d.order, order)
        assert torch.equal(d.order[d.inverse], torch.arange(T * k))
        assert torch.equal(d.counts, expert_counts(idx, E))
        d2 = route(idx, E, expert_counts(idx, E))
        assert torch.equal(d2.offs, d.offs) and d2.offs.dtype == torch.int32


@pytest.mark.parametrize("T,E,k,score,bias", [(23, 6, 2, "softmax", False), (31, 9, 1, "sigmoid", True),
                                              (40, 64, 8, "softmax", True), (17, 13, 4, "sigmoid", False)])
@pytest.mark.parametrize("normalize", [True, False])
def test_backward_reference_equals_autograd(T: int, E: int, k: int, score: str, bias: bool, normalize: bool) -> None:
    """The derivation the backward kernel implements, against autograd through Router's eager maths
    (float64), for each output separately and for a mix."""
    torch.manual_seed(T * E)
    r = Router(4, E, k, RouterConfig(score=score, bias_balancing=bias, normalize_topk=normalize))
    if bias:
        r.expert_bias.copy_(torch.randn(E) * 0.1)
    r.double()  # the bias stays fp32 (Router._apply); the scores it is added to are fp64
    logits = (torch.randn(T, E, dtype=torch.float64) * 2).requires_grad_()
    out = r._eager(logits)
    p = logits.detach().softmax(-1) if score == "softmax" else logits.detach().sigmoid()
    s = p.gather(-1, out.indices).sum(-1)
    gw = torch.randn(T, k, dtype=torch.float64)
    for cw, ca, cz in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.7, -0.3)):
        loss = cw * (out.weights * gw).sum() + ca * out.aux_loss + cz * out.z_loss
        (want,) = torch.autograd.grad(loss, logits, retain_graph=True)
        got = fused.backward_reference(logits.detach(), out.weights.detach(), out.indices, s, out.load,
                                       cw * gw if cw else None, torch.tensor(ca, dtype=torch.float64),
                                       torch.tensor(cz, dtype=torch.float64), score == "sigmoid", normalize)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


CASES = r"""
import json, torch
from kernels import router as R
from moe_study.model.moe import MoE
from moe_study.model.router import Router
from moe_study.config.schema import RouterConfig

def err(a, b, floor=1e-12):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))

out = {}
# (T, E, k, score, bias, programs): ragged token tiles (BT is 64 at E<=16, 16 at E=64, 4 at E=256), E not
# a power of two, k=1, the largest E; few programs (each loops over several tiles); more partial rows
# (23) than router_finalize sums a step (16 at E=256)
for T, E, k, score, bias, progs in [(37, 6, 2, "softmax", False, 512), (37, 6, 2, "sigmoid", True, 512),
                                    (70, 13, 1, "softmax", True, 512), (70, 64, 8, "softmax", False, 512),
                                    (70, 64, 8, "sigmoid", True, 2), (19, 150, 5, "sigmoid", False, 512),
                                    (21, 256, 3, "softmax", True, 512), (130, 5, 4, "softmax", False, 1),
                                    (90, 256, 2, "sigmoid", True, 512), (150, 40, 6, "softmax", True, 3)]:
    R.MAX_PROGRAMS = progs
    torch.manual_seed(T + E)
    norm = (T + E) % 2 == 1  # both gates: renormalised top-k weights and the raw scores
    r = Router(4, E, k, RouterConfig(score=score, bias_balancing=bias, normalize_topk=norm))
    if bias:
        r.expert_bias.copy_(torch.randn(E) * 0.1)
    logits = torch.randn(T, E) * 2
    gw = torch.randn(T, k)
    key = f"T{T}_E{E}_k{k}_{score}_p{progs}" + ("_bias" if bias else "") + ("_norm" if norm else "")
    res = {}
    for path in ("eager", "fused"):
        fn = r._eager if path == "eager" else r._fused
        grads = []
        for term in ("weights", "aux", "z"):
            l = logits.clone().requires_grad_()
            o = fn(l)
            loss = {"weights": lambda: (o.weights * gw).sum(), "aux": lambda: o.aux_loss, "z": lambda: o.z_loss}[term]()
            loss.backward()
            grads.append(l.grad)
        res[path] = (o, grads)
    (oe, ge), (of, gf) = res["eager"], res["fused"]
    out[key] = {"indices_equal": bool(torch.equal(oe.indices, of.indices)),
                "counts_equal": bool(torch.equal(oe.counts, of.counts)) and of.counts.dtype == torch.int64,
                "weights": err(of.weights, oe.weights), "aux": err(of.aux_loss, oe.aux_loss),
                "z": err(of.z_loss, oe.z_loss), "load": err(of.load, oe.load),
                # with k=1 the weights are 1 and their true gradient 0 (eager: rounding noise): the floor
                "d_weights": err(gf[0], ge[0], 1e-2), "d_aux": err(gf[1], ge[1]), "d_z": err(gf[2], ge[2])}

# the whole layer through Router.forward (fused router) vs the eager router, and the balancing counts
R.MAX_PROGRAMS = 512
torch.manual_seed(0)
moe = MoE(16, 8, 6, 2, backend="reference", router=RouterConfig(bias_balancing=True))
for p in moe.parameters():
    torch.nn.init.normal_(p, std=0.3)
moe.train()
x = torch.randn(45, 16)
layer = {}
for opt in ("eager", "auto"):
    R.OPTIONS["router"] = opt
    moe.router.pending_load.zero_()
    xi = x.clone().requires_grad_()
    o = moe(xi)
    (o.y.square().sum() + o.aux_loss + o.z_loss).backward()
    r = moe.router
    layer[opt] = (r.last_path, o.y, xi.grad, r.gate.weight.grad.clone(), r.pending_load.clone())
    moe.zero_grad()
names = ["y", "dx", "dgate", "pending_load"]
out["layer"] = {n: err(a, b) for n, a, b in zip(names, layer["auto"][1:], layer["eager"][1:])}
out["layer_paths"] = [layer["eager"][0], layer["auto"][0]]

# ties go to the lowest expert id (all-equal logits; and a tie between experts 5 and 2 for the second slot)
r = Router(4, 8, 3)
t = torch.zeros(3, 8)
t[1, 5] = t[1, 2] = 1.0
t[1, 7] = 2.0
out["ties"] = r._fused(t).indices.tolist()

# a launch error: logged once, the eager router runs from then on, with its result
R.OPTIONS["router"] = "auto"
kern = R._kernels()
R._kernels = lambda: {name: None for name in kern}  # 'NoneType' is not subscriptable at launch
xs = torch.randn(9, 4)
o = r(xs)
ref = r._eager(r.gate(xs))
out["fallback"] = [r.last_path, bool(R._switch), bool(torch.equal(o.indices, ref.indices)),
                   bool(torch.equal(o.weights, ref.weights))]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_fused_router_matches_eager_in_interpreter() -> None:
    res = run_interpreted(CASES)
    assert res.pop("layer_paths") == ["eager", "fused"]
    assert res.pop("ties") == [[0, 1, 2], [7, 2, 5], [0, 1, 2]]
    assert res.pop("fallback") == ["eager", True, True, True]
    for case, errs in res.items():
        for name, v in errs.items():
            if isinstance(v, bool):
                assert v, f"{case}: {name}"
            else:
                # gradients: cancellation in p * (g - sum p g) when the loads are nearly even
                assert v < (5e-5 if name.startswith("d") else 1e-5), f"{case} {name}: relative error {v:.2e}"


def test_compiled_router_traces_the_eager_maths() -> None:
    """Under torch.compile the router is the eager maths (fused by Inductor), not the kernels."""
    torch._dynamo.reset()
    why = torch.compile(lambda lg: fused.problem(lg, 2), backend="eager", fullgraph=True)(torch.zeros(4, 8))
    assert why is not None and "torch.compile" in why
    assert "torch.compile" not in (fused.problem(torch.zeros(4, 8), 2) or "")


def test_eager_option_and_cpu_keep_the_eager_router() -> None:
    assert fused.problem(torch.zeros(4, 8), 2) is not None or fused.interpreting()
    prev = fused.OPTIONS["router"]
    try:
        fused.OPTIONS["router"] = "eager"
        assert "eager" in (fused.problem(torch.zeros(4, 8), 2) or "")
    finally:
        fused.OPTIONS["router"] = prev


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("E,k,sigmoid,bias", [(64, 8, False, False), (64, 8, True, True), (256, 8, False, True),
                                              (8, 2, False, False), (13, 1, True, False)])
def test_kernels_compile_for_sm90_without_spills(E: int, k: int, sigmoid: bool, bias: bool) -> None:
    """AOT for the H100 (no GPU needed): every kernel keeps its tiles in registers at its block sizes."""
    try:
        report = fused.compile_report(E, k, sigmoid, bias)
    except (ImportError, FileNotFoundError) as err:  # a Triton build without the NVIDIA backend or ptxas
        pytest.skip(f"cannot AOT-compile for sm_90 here: {err}")
    for name, num in report.items():
        assert num["spill_stores"] == 0 and num["spill_loads"] == 0, (name, num)
        assert 0 < num["registers"] <= 255, (name, num)


# ------------------------------------------------------------------------------------------- GPU
def clean_rows(logits: torch.Tensor, k: int, score: str, bias: torch.Tensor | None) -> torch.Tensor:
    """(T,) bool: tokens whose top-k (and its order) cannot depend on how either softmax rounds: every
    adjacent pair of the k+1 largest selection scores is 1e-5 apart, or an exact tie of equal logits
    (and biases), which both implementations break towards the lowest id."""
    x = logits.float()
    p = x.softmax(-1) if score == "softmax" else x.sigmoid()
    b = bias if bias is not None else torch.zeros(x.shape[1], device=x.device)
    sel = p + b
    o = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k + 1]
    v, xs, bs = sel.gather(-1, o), x.gather(-1, o), b[o]
    same = (xs[:, :-1] == xs[:, 1:]) & (bs[:, :-1] == bs[:, 1:])
    return ((v[:, :-1] - v[:, 1:] > 1e-5) | same).all(-1)


def _compare_on_gpu(T: int, E: int, k: int, score: str, bias: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(T + E)
    # bf16-representable values also for fp32: distinct logits are then far apart relative to the
    # rounding of either softmax; near-ties through the bias are left out (clean_rows)
    logits = (torch.randn(T, E, device="cuda") * 1.5).to(torch.bfloat16).to(dtype)
    b = torch.randn(E, device="cuda") * 0.05 if bias else None
    gw = torch.randn(T, k, device="cuda")
    outs, grads = {}, {}
    for name in ("fused", "ref"):
        lg = logits.clone().requires_grad_()
        o = fused.fused_router(lg, k, score, b) if name == "fused" else stable_router(lg, k, score, b)
        assert o is not None, fused._switch.reason
        w, idx, counts, load, aux, z = o
        ((w * gw).sum() + 0.7 * aux + 0.3 * z).backward()
        outs[name], grads[name] = o, lg.grad
    (w, idx, counts, load, aux, z), (w2, idx2, counts2, load2, aux2, z2) = outs["fused"], outs["ref"]
    ok = clean_rows(logits, k, score, b)
    unclean = int((~ok).sum())
    # a bias makes near-ties of selection scores common (~0.4% of tokens at E=64, k=8); they are left out
    assert unclean <= max(2, T // 100), f"{unclean} near-tied tokens of {T}"
    assert torch.equal(idx[ok], idx2[ok])
    torch.testing.assert_close(w[ok], w2[ok], rtol=1e-5, atol=1e-6)
    assert int((counts - counts2).abs().sum()) <= 2 * k * unclean
    if unclean == 0:
        torch.testing.assert_close(load, load2, rtol=0, atol=0)  # the same correctly rounded division
    assert abs(float(aux) - float(aux2)) <= (1e-4 + 1e-3 * unclean) * abs(float(aux2)), "aux"
    assert abs(float(z) - float(z2)) <= 1e-4 * abs(float(z2)), "z"
    assert grads["fused"].dtype == dtype
    g, g2 = grads["fused"].float()[ok], grads["ref"].float()[ok]
    rel = float((g - g2).norm() / g2.norm())
    assert rel < (1e-4 if dtype == torch.float32 else 1e-2), f"dlogits: relative error {rel:.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16384, 64, 8), (1000, 13, 3), (777, 256, 1), (4097, 8, 2)])
@pytest.mark.parametrize("score,bias", [("softmax", False), ("sigmoid", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_router_matches_eager_maths(shape: tuple[int, int, int], score: str, bias: bool,
                                              dtype: torch.dtype) -> None:
    _compare_on_gpu(*shape, score, bias, dtype)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_stable_reference_is_the_eager_router_without_ties() -> None:
    """stable_router equals Router's eager maths (torch.topk) on fp32 logits, where ties do not occur."""
    torch.manual_seed(5)
    r = Router(32, 64, 8, RouterConfig(normalize_topk=True)).cuda()
    x = torch.randn(4096, 32, device="cuda")
    o = r._eager(r.gate(x))
    w, idx, counts, load, aux, z = stable_router(r.gate(x), 8, "softmax", None)
    assert torch.equal(o.indices, idx) and torch.equal(o.counts, counts)
    torch.testing.assert_close(o.weights, w)
    torch.testing.assert_close(o.aux_loss, aux)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16384, 8, 64, 1024, 512), (1000, 2, 8, 264, 136)])
def test_gpu_moe_layer_same_with_fused_and_eager_router(shape: tuple[int, int, int, int, int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole layer (fp32) with the fused router equals the eager router, and route() with the
    router's counts equals route() recounting them. A near-tie of two scores (a few ulps apart) may
    round differently in the two softmaxes and swap an expert: such tokens (at most 0.1%) are left out
    of the per-token comparison and loosen the one for the gate's gradient."""
    T, k, E, d, f = shape
    torch.manual_seed(0)
    moe = MoE(d, f, E, k, backend="auto").cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(T, d, device="cuda")
    outs = {}
    for opt in ("eager", "auto"):
        monkeypatch.setitem(fused.OPTIONS, "router", opt)
        xi = x.clone().requires_grad_()
        o = moe(xi)
        (o.y.square().mean() + 0.01 * o.aux_loss + 1e-3 * o.z_loss).backward()
        path = moe.router.last_path
        with torch.no_grad():
            r = moe.router(x)
        outs[opt] = (path, r.indices, o.y.detach(), xi.grad, moe.router.gate.weight.grad.clone())
        moe.zero_grad()
        a, b = route(r.indices, E, r.counts), route(r.indices, E)
        assert all(torch.equal(u, v) for u, v in ((a.order, b.order), (a.inverse, b.inverse), (a.offs, b.offs)))
    assert [outs["eager"][0], outs["auto"][0]] == ["eager", "fused"]
    same = (outs["eager"][1] == outs["auto"][1]).all(-1)
    assert float(same.float().mean()) >= 0.999
    for name, a, b in zip(("y", "dx"), outs["auto"][2:4], outs["eager"][2:4], strict=True):
        rel = float((a[same] - b[same]).norm() / b[same].norm())
        assert rel < 1e-4, f"{name}: relative error {rel:.3g}"
    a, b = outs["auto"][4], outs["eager"][4]
    rel = float((a - b).norm() / b.norm())
    assert rel < (1e-4 if bool(same.all()) else 1e-2), f"dgate: relative error {rel:.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16384, 8, 64), (1000, 2, 8), (777, 3, 256), (4097, 1, 13)])
def test_gpu_route_equals_int64_argsort(shape: tuple[int, int, int]) -> None:
    """route() sorting uint8 keys gives torch's int64 stable argsort (a stable sort does not depend on the key
    dtype)."""
    T, k, E = shape
    torch.manual_seed(3)
    idx = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
    d = route(idx, E)
    ref = torch.argsort(idx.reshape(-1), stable=True)
    assert torch.equal(d.order, ref)
    assert torch.equal(d.order[d.inverse], torch.arange(T * k, device="cuda"))
    assert torch.equal(d.counts, expert_counts(idx, E))


# ------------------------------------------------------------- the LM loss reaches every router
LM_GRADS = r"""
import torch
from moe_study.accounting import Architecture
from moe_study.model.lm import build_model
from moe_study.model.router import Router

def lm_router_grads(device, normalize, top_k):
    # the language-model loss alone (no balancing or z loss) of a 3-layer MoE LM, first layer dense:
    # (which router path ran, max |dL/d gate weight|) of each MoE layer's router
    torch.manual_seed(0)
    a = Architecture(kind="moe", d_model=16, n_layers=3, n_heads=2, seq_len=8, ffn_hidden=8, experts=6,
                     top_k=top_k, dense_ffn_hidden=24, first_dense_layers=1)
    m = build_model(a, 50, "reference", {"normalize_topk": normalize}).to(device)
    idx = torch.randint(0, 50, (2, 8)).to(device)
    m(idx, idx.roll(-1, 1)).ce.backward()
    routers = [mod for mod in m.modules() if isinstance(mod, Router)]
    return [(mod.last_path, float(mod.gate.weight.grad.abs().max())) for mod in routers]
"""


def _check_lm_router_grads(grads: dict, path: str) -> None:
    for key, layers in grads.items():
        assert len(layers) == 2 and all(p == path for p, _ in layers), (key, layers)
        normalize, k = key.split("_")
        if normalize == "raw" or k != "k1":  # every router learns from the LM loss
            assert all(g > 1e-7 for _, g in layers), (key, layers)
        else:  # renormalised top-1: the weight is exactly 1, no LM gradient (rounding noise only)
            assert all(g < 1e-9 for _, g in layers), (key, layers)


def _grads_here(device: str) -> dict:
    ns: dict = {}
    exec(LM_GRADS, ns)
    return {f"{'norm' if n else 'raw'}_k{k}": ns["lm_router_grads"](device, n, k)
            for n in (False, True) for k in (1, 3)}


def test_lm_loss_reaches_every_router_eager() -> None:
    assert RouterConfig().normalize_topk is False  # the paper's gate is the default
    _check_lm_router_grads(_grads_here("cpu"), "eager")


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_lm_loss_reaches_every_router_fused_in_interpreter() -> None:
    code = LM_GRADS + """
import json
out = {f"{'norm' if n else 'raw'}_k{k}": lm_router_grads("cpu", n, k) for n in (False, True) for k in (1, 3)}
print("RESULT " + json.dumps(out))
"""
    _check_lm_router_grads(run_interpreted(code), "fused")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_lm_loss_reaches_every_router_fused() -> None:
    _check_lm_router_grads(_grads_here("cuda"), "fused")


def test_top1_keeps_topk_on_cpu_and_is_the_row_max_on_cuda() -> None:
    """CPU: topk itself (its ties differ from max's, and CPU runs stay byte-identical). CUDA: the row max, the
    same values as topk and, without ties, the same ids (with ties the lowest, like the fused router)."""
    from moe_study.model.router import _topk

    s = torch.tensor([[0.2, 0.5, 0.5, 0.1], [0.9, 0.0, 0.05, 0.05]])
    for k in (1, 2):
        v, i = _topk(s, k)
        assert torch.equal(v, s.topk(k, dim=-1).values) and torch.equal(i, s.topk(k, dim=-1).indices)
    if CUDA:
        x = torch.randn(4096, 31, device="cuda").softmax(-1)
        v, i = _topk(x, 1)
        assert torch.equal(v, x.topk(1, dim=-1).values) and torch.equal(i, x.topk(1, dim=-1).indices)
        assert _topk(s.cuda(), 1)[1][0].item() == 1
        grad = torch.autograd.grad(_topk(x.requires_grad_(), 1)[0].sum(), x)[0]
        assert torch.equal(grad, torch.zeros_like(x).scatter_(1, i, 1.0))
