"""The fused MoE expert block (kernels/moe_fused.py) against the unfused reference maths.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, float32: the
interpreter's bf16 dot is not usable), in a subprocess because the interpreter is chosen when the
kernels are defined. That checks the tile walk over expert row ranges (empty experts, ragged
sizes), the gather, both epilogues and the gathered weight gradient. On a GPU the same comparisons
run in bf16 at benchmark sizes. The fallback of a "fused" request where it cannot run is tested
in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_study.model.moe import MoE

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

# Triton 3.6's interpreter converts 1-element arrays with int(), an error since numpy 2.4
INTERPRETER_SHIM = """
import triton.runtime.interpreter as _ti
_orig = _ti._patch_lang_tensor
def _patched(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
_ti._patch_lang_tensor = _patched
"""

CASES = r"""
import json, torch
from kernels import moe_fused
from kernels.grouped_gemm import _reference
from kernels.swiglu import swiglu
from kernels.experts import route
from moe_study.model.moe import MoE

def routed(T, k, E, seed, empty):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    scores[:, empty] = -1.0  # never chosen
    return scores.topk(k, dim=-1).indices

def errors(pairs):
    return {n: (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
            for n, a, b in pairs}

out = {}
for (T, k, E, d, f, empty), wgrad in [((37, 2, 5, 48, 40, [3]), "gather"), ((37, 2, 5, 48, 40, [3]), "permuted"),
                                      ((20, 1, 4, 32, 24, [0, 2]), "gather"), ((64, 3, 6, 40, 56, []), "permuted")]:
    moe_fused.OPTIONS["wgrad"] = wgrad
    torch.manual_seed(T)
    x = torch.randn(T, d, requires_grad=True)
    w13 = (torch.randn(E, d, 2 * f) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(E, f, d) / f ** 0.5).requires_grad_()
    disp = route(routed(T, k, E, T, empty), E)
    src = (disp.order // k).to(torch.int32)
    y = moe_fused.fused_experts(x, w13, w2, src, disp.inverse, disp.offs, k, plain="triton")
    gy = torch.randn_like(y)
    y.backward(gy)
    xr, w13r, w2r = (t.detach().clone().requires_grad_() for t in (x, w13, w2))
    yr = _reference(swiglu(_reference(xr[disp.order // k], w13r, disp.offs), f), w2r, disp.offs)
    yr.backward(gy)
    out[f"T{T}k{k}E{E}_{wgrad}"] = errors([("y", y, yr), ("dx", x.grad, xr.grad), ("dw13", w13.grad, w13r.grad),
                                  ("dw2", w2.grad, w2r.grad)])
    out[f"T{T}k{k}E{E}_{wgrad}"]["empty_dw_zero"] = all(float(w13.grad[e].abs().max()) == 0.0 for e in empty)

# the block with the combine (gate weights and un-permutation) folded in, each combine option
for (T, k, E, d, f, empty), wgrad in [((37, 2, 5, 48, 40, [3]), "permuted"), ((20, 1, 4, 32, 24, [0, 2]), "gather"),
                                      ((64, 3, 6, 40, 56, []), "permuted")]:
    moe_fused.OPTIONS["wgrad"] = wgrad
    torch.manual_seed(T)
    x = torch.randn(T, d)
    w13 = torch.randn(E, d, 2 * f) / d ** 0.5
    w2 = torch.randn(E, f, d) / f ** 0.5
    weights = torch.rand(T, k)
    disp = route(routed(T, k, E, T + 1, empty), E)
    src = (disp.order // k).to(torch.int32)
    gy = torch.randn(T, d)
    # eager reference maths: per-expert matmuls on the gathered rows, then the weighted sum of the k slots
    ref = [t.clone().requires_grad_() for t in (x, w13, w2, weights)]
    y_perm = _reference(swiglu(_reference(ref[0][disp.order // k], ref[1], disp.offs), f), ref[2], disp.offs)
    yr = (y_perm[disp.inverse].view(T, k, d) * ref[3].unsqueeze(-1)).sum(1)
    yr.backward(gy)
    for mode in moe_fused.COMBINE_MODES:
        moe_fused.OPTIONS["combine"] = mode
        ins = [t.clone().requires_grad_() for t in (x, w13, w2, weights)]
        y = moe_fused.fused_moe(*ins, src, disp.order, disp.inverse, disp.offs, k, plain="triton")
        y.backward(gy)
        name = f"combine_{mode}_T{T}k{k}E{E}_{wgrad}"
        out[name] = errors([("y", y, yr), *((n, a.grad, b.grad) for n, a, b in zip(["dx", "dw13", "dw2", "dweights"],
                                                                                     ins, ref))])
        out[name]["empty_dw_zero"] = all(float(ins[1].grad[e].abs().max()) == 0.0 for e in empty)
moe_fused.OPTIONS.update(wgrad="permuted", combine="slots")

# a combine kernel that fails (forward or backward) falls back to the unfused maths, same results
for broken in ("combine_gemm", "combine_dact"):
    real = getattr(moe_fused, broken)
    def fail(*args, **kwargs):
        raise RuntimeError("simulated compile failure")
    setattr(moe_fused, broken, fail)
    ins = [t.clone().requires_grad_() for t in (x, w13, w2, weights)]
    y = moe_fused.fused_moe(*ins, src, disp.order, disp.inverse, disp.offs, k, plain="triton")
    y.backward(gy)
    out[f"fallback_{broken}"] = errors([("y", y, yr), *((n, a.grad, b.grad) for n, a, b in
                                                          zip(["dx", "dw13", "dw2", "dweights"], ins, ref))])
    out[f"fallback_{broken}"]["disabled"] = float(bool(moe_fused.combine_switch))
    setattr(moe_fused, broken, real)
    moe_fused.combine_switch.reset()

# the whole layer: backend "fused" (each combine option) vs "reference" from the same weights
torch.manual_seed(0)
ref = MoE(32, 24, 6, 2, backend="reference")
for p in ref.parameters():  # the module leaves init to LM.reset_parameters
    torch.nn.init.normal_(p, std=0.2)
fused = MoE(32, 24, 6, 2, backend="fused")
fused.load_state_dict(ref.state_dict())
x = torch.randn(2, 9, 32)
outs = {}
for name, m, mode in [("ref", ref, "slots"), *((f"fused_{c}", fused, c) for c in moe_fused.COMBINE_MODES)]:
    moe_fused.OPTIONS["combine"] = mode
    m.zero_grad()
    xi = x.clone().requires_grad_()
    o = m(xi)
    (o.y.square().sum() + o.aux_loss).backward()
    outs[name] = (o.y, xi.grad, m.experts.w13.grad, m.experts.w2.grad, m.router.gate.weight.grad)
for mode in moe_fused.COMBINE_MODES:
    out[f"layer_{mode}"] = errors([(n, a, b) for n, a, b in zip(["y", "dx", "dw13", "dw2", "dgate"],
                                                                outs[f"fused_{mode}"], outs["ref"])])
out["layer_backend"] = fused.experts.last_backend
moe_fused.OPTIONS["combine"] = "slots"

# the weighted scatter of kernels/permute.py (dy_perm of the fused combine), launched directly
from kernels import permute
T, k, d = 29, 3, 40
g = torch.randn(T, d)
weights = torch.rand(T, k)
disp = route(routed(T, k, 7, 5, []), 7)
dy_perm = torch.empty(T * k, d)
permute._kernels()["scatter_rows"][(T,)](g, disp.inverse, weights, dy_perm, d, K=k, BD=permute.pow2_at_least(d),
                                          WEIGHTED=True)
out["scatter_weighted"] = errors([("dy_perm", dy_perm, g[disp.order // k] * weights.reshape(-1)[disp.order, None]),
                                  ("eager", permute.scatter_weighted(g, weights, disp.order, disp.inverse), dy_perm)])

# the SwiGLU kernels of the unfused path (kernels/swiglu.py), launched directly
import torch.nn.functional as F
from kernels import swiglu as sw
rows, f = 37, 40
h = torch.randn(rows, 2 * f)
act = torch.empty(rows, f)
sw.fwd[sw._grid(rows, f)](h, act, rows, f, BM=sw.BM, BN=sw.BN)
g = torch.randn(rows, f)
dh = torch.empty_like(h)
sw.bwd[sw._grid(rows, f)](h, g, dh, rows, f, BM=sw.BM, BN=sw.BN)
hr = h.clone().requires_grad_()
ar = F.silu(hr[:, :f]) * hr[:, f:]
ar.backward(g)
out["swiglu"] = errors([("fwd", act, ar), ("bwd", dh, hr.grad)])
print("RESULT " + json.dumps(out))
"""


def run_interpreted(code: str) -> dict:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SHIM + code], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_fused_kernels_match_reference_in_interpreter() -> None:
    res = run_interpreted(CASES)
    assert res.pop("layer_backend") == "fused+triton"
    for case, errs in res.items():
        if errs.pop("disabled", 1.0) != 1.0:
            raise AssertionError(f"{case}: the failing combine kernel did not disable the fused combine once")
        if "empty_dw_zero" in errs:
            assert errs.pop("empty_dw_zero"), f"{case}: an expert without rows got a nonzero weight gradient"
        for name, rel in errs.items():
            assert rel < 1e-5, f"{case} {name}: relative error {rel:.2e}"


def test_fused_request_falls_back_with_reason_where_it_cannot_run() -> None:
    """CPU without the interpreter: "fused" runs the unfused path, says why, and gives its result."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter on: the fused path would run")
    torch.manual_seed(0)
    ref = MoE(16, 8, 4, 2, backend="reference")
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    fused = MoE(16, 8, 4, 2, backend="fused")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(fused(x).y, ref(x).y, rtol=0, atol=0)
    assert fused.experts.last_backend == "reference"
    assert "fused" in (fused.experts.last_fallback or "")


def test_unknown_expert_backend_is_an_early_error() -> None:
    with pytest.raises(ValueError, match="expert backend 'fast'"):
        MoE(16, 8, 4, 2, backend="fast")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("combine", ["slots", "atomic", "unfused"])
@pytest.mark.parametrize("wgrad", ["permuted", "gather"])
@pytest.mark.parametrize("shape", [(4096, 8, 64, 1024, 512), (8192, 1, 8, 512, 896), (1000, 2, 8, 264, 136)])
def test_fused_layer_matches_unfused_on_gpu(shape: tuple[int, int, int, int, int], wgrad: str, combine: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import moe_fused

    monkeypatch.setitem(moe_fused.OPTIONS, "wgrad", wgrad)
    monkeypatch.setitem(moe_fused.OPTIONS, "combine", combine)
    T, k, E, d, f = shape
    torch.manual_seed(0)
    ref = MoE(d, f, E, k, backend="auto").cuda()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.02)
    fused = MoE(d, f, E, k, backend="fused").cuda()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, d, device="cuda")
    outs = {}
    for name, m in (("ref", ref), ("fused", fused)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o = m(xi)
        assert name == "ref" or o.y.dtype == torch.bfloat16, f"y is {o.y.dtype} under bf16 autocast"
        o.y.float().square().mean().backward()
        outs[name] = (o.y.float(), xi.grad, m.experts.w13.grad, m.experts.w2.grad, m.router.gate.weight.grad)
    assert fused.experts.last_backend.startswith("fused+"), fused.experts.last_fallback
    for name, a, b in zip(["y", "dx", "dw13", "dw2", "dgate"], outs["fused"], outs["ref"], strict=True):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g} (bf16)"


def _gpu_block_inputs(shape: tuple[int, int, int, int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 expert-block inputs on the GPU, routed by random scores with every (t, e) pair distinct."""
    from kernels.experts import route

    T, k, E, d, f = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, d, 2 * f, device="cuda", generator=g) / d ** 0.5).bfloat16()
    w2 = (torch.randn(E, f, d, device="cuda", generator=g) / f ** 0.5).bfloat16()
    top = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)  # fp32, as the router gives them
    disp = route(top.indices, E)
    return {"x": x, "w13": w13, "w2": w2, "weights": weights, "order": disp.order, "inverse": disp.inverse,
            "offs": disp.offs, "gy": torch.randn(T, d, device="cuda", generator=g).bfloat16()}


def _fused_block_grads(inp: dict[str, torch.Tensor], k: int) -> list[torch.Tensor]:
    """y and the gradients wrt x, w13, w2 and the gate weights of the fused block (moe_fused.OPTIONS as set)."""
    from kernels import moe_fused
    from kernels.grouped_gemm import backend_status

    plain = "cutlass" if backend_status("cuda", torch.bfloat16)["cutlass"] is None else "torch_grouped"
    ins = [inp[n].clone().requires_grad_() for n in ("x", "w13", "w2", "weights")]
    src = (inp["order"] // k).to(torch.int32)
    y = moe_fused.fused_moe(*ins, src, inp["order"], inp["inverse"], inp["offs"], k, plain)
    return [y, *torch.autograd.grad(y, ins, inp["gy"])]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("combine", ["slots", "atomic", "unfused"])
@pytest.mark.parametrize("shape", [(16384, 8, 64, 1024, 512), (1000, 2, 8, 264, 136)])
def test_gpu_fused_combine_matches_eager_maths(shape: tuple[int, int, int, int, int], combine: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused block with its combine (bf16) against the eager maths in fp32 on the same bf16 values:
    output and the gradients wrt x, w13, w2 and the gate weights (the router's gradient path)."""
    from kernels import moe_fused
    from kernels.grouped_gemm import _reference

    monkeypatch.setitem(moe_fused.OPTIONS, "combine", combine)
    T, k, E, d, f = shape
    inp = _gpu_block_inputs(shape)
    got = _fused_block_grads(inp, k)
    ref = [inp[n].float().clone().requires_grad_() for n in ("x", "w13", "w2", "weights")]
    order, inverse, offs = inp["order"], inp["inverse"], inp["offs"]
    h13 = _reference(ref[0][order // k], ref[1], offs)
    y_perm = _reference(torch.nn.functional.silu(h13[:, :f]) * h13[:, f:], ref[2], offs)
    y = (y_perm[inverse].view(T, k, d) * ref[3].unsqueeze(-1)).sum(1)
    want = [y, *torch.autograd.grad(y, ref, inp["gy"].float())]
    assert got[0].dtype == torch.bfloat16 and got[4].dtype == torch.float32
    for name, a, b in zip(["y", "dx", "dw13", "dw2", "dweights"], got, want, strict=True):
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"{combine} {name}: relative error {rel:.3g} (bf16)"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16384, 8, 64, 1024, 512), (1000, 2, 8, 264, 136)])
def test_gpu_fused_combine_slots_is_deterministic(shape: tuple[int, int, int, int, int],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The default combine ("slots") gives bitwise the same output and gradients on every run (no
    atomics: each slot written once, fixed summation order)."""
    from kernels import moe_fused

    monkeypatch.setitem(moe_fused.OPTIONS, "combine", "slots")
    inp = _gpu_block_inputs(shape, seed=1)
    first, second = _fused_block_grads(inp, shape[1]), _fused_block_grads(inp, shape[1])
    for name, a, b in zip(["y", "dx", "dw13", "dw2", "dweights"], first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def _gmm_launch_args(epi: int, atomic: bool, shape: tuple[int, int, int, int, int]) -> dict[str, object]:
    """The arguments (dtypes, strides, sizes) moe_fused passes to gmm for the combine's down projection
    (EPI 3) and the dact GEMM (EPI 4) at `shape`, for kernels.aot's launch-time specialisation."""
    from kernels import moe_fused

    T, k, E, d, f = shape

    def t(dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(16, dtype=dtype)

    bf, f32 = torch.bfloat16, torch.float32
    common = {"a_ptr": t(bf), "src_ptr": t(torch.int32), "b_ptr": t(bf), "act_ptr": t(bf), "h_ptr": t(bf),
              "offs_ptr": t(torch.int32), "slot_ptr": t(torch.int64), "gw_ptr": t(f32), "E": E, "topk": k,
              "stride_be": f * d, "EP": 64, "EPI": epi, "ATOMIC": atomic}
    if epi == 3:  # act (T*k, f) @ w2[e] (f, d) -> slots (T*k, d) bf16 or atomic (T, d) fp32
        out = t(f32 if atomic else bf)  # also the placeholder of the unused act/h pointers
        return {**common, "c_ptr": out, "act_ptr": out, "h_ptr": out, "pw_ptr": t(torch.int32), "N": d, "K": f,
                "stride_am": f, "stride_bk": d, "stride_bn": 1, "stride_cm": d, "stride_hm": d, "stride_pw": 0,
                "GATHER": False}
    return {**common, "c_ptr": t(bf), "pw_ptr": t(f32), "N": f, "K": d, "stride_am": d, "stride_bk": 1,
            "stride_bn": d, "stride_cm": 2 * f, "stride_hm": 2 * f, "stride_pw": -(-f // moe_fused.MIN_BN),
            "GATHER": True}


def _aot_cases() -> list[tuple[str, tuple[int, ...]]]:
    from kernels import moe_fused

    return ([("combine_slots", c) for c in moe_fused.COMBINE_CONFIGS]
            + [("combine_atomic", c) for c in moe_fused.COMBINE_CONFIGS]
            + [("dact", c) for c in moe_fused.DACT_CONFIGS])


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("shape", [(16384, 8, 64, 1024, 512), (65536, 2, 16, 512, 448)])
def test_combine_kernels_compile_for_sm90_without_spills(shape: tuple[int, int, int, int, int]) -> None:
    """Every autotune config of the combine kernels (EPI 3 slots/atomic, EPI 4) and the weighted
    scatter compiles for the H100 with Triton's launch-time specialisation and no register spills."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces triton.jit")
    from kernels import aot, moe_fused, permute

    if aot.ptxas() is None:
        pytest.skip("no ptxas")
    spills = {}
    for name, (bm, bn, bk, warps, stages) in _aot_cases():
        args = {**_gmm_launch_args(4 if name == "dact" else 3, name == "combine_atomic", shape), "BM": bm, "BN": bn,
                "BK": bk}
        r = aot.sm90_resources(moe_fused.gmm, args, warps, stages)
        spills[f"{name} {(bm, bn, bk, warps, stages)}"] = r["spill_stores"] + r["spill_loads"]
    d, k = shape[3], shape[1]
    scatter = {"x_ptr": torch.empty(16, dtype=torch.bfloat16), "inv_ptr": torch.empty(16, dtype=torch.int64),
               "w_ptr": torch.empty(16), "out_ptr": torch.empty(16, dtype=torch.bfloat16), "d": d, "K": k,
               "BD": permute.pow2_at_least(d), "WEIGHTED": True}
    r = aot.sm90_resources(permute._kernels()["scatter_rows"], scatter, 4, 3)
    spills["scatter_rows weighted"] = r["spill_stores"] + r["spill_loads"]
    assert not any(spills.values()), {n: s for n, s in spills.items() if s}


def test_bench_layer_backend_options_parse_and_reject_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from kernels_bench import parse_backend

    assert parse_backend("fused") == ("fused", {})
    assert parse_backend("fused:gather") == ("fused", {"wgrad": "gather"})
    assert parse_backend("fused:combine=atomic:wgrad=gather") == ("fused", {"combine": "atomic", "wgrad": "gather"})
    for bad in ("fused:combine=atomc", "fused:nosuch=1"):
        with pytest.raises(ValueError, match="is not one of"):
            parse_backend(bad)
