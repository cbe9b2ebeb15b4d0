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

from stages.model import MoE

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
from stages.model import MoE, route

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

# the whole layer: backend "fused" vs "reference" from the same weights
torch.manual_seed(0)
ref = MoE(32, 24, 6, 2, backend="reference")
for p in ref.parameters():  # the module leaves init to LM.reset_parameters
    torch.nn.init.normal_(p, std=0.2)
fused = MoE(32, 24, 6, 2, backend="fused")
fused.load_state_dict(ref.state_dict())
x = torch.randn(2, 9, 32)
outs = {}
for name, m in (("ref", ref), ("fused", fused)):
    xi = x.clone().requires_grad_()
    o = m(xi)
    (o.y.square().sum() + o.aux_loss).backward()
    outs[name] = (o.y, xi.grad, m.experts.w13.grad, m.experts.w2.grad, m.router.gate.weight.grad)
out["layer"] = errors([(n, a, b) for n, a, b in zip(["y", "dx", "dw13", "dw2", "dgate"], outs["fused"], outs["ref"])])
out["layer_backend"] = fused.experts.last_backend

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
@pytest.mark.parametrize("wgrad", ["permuted", "gather"])
@pytest.mark.parametrize("shape", [(4096, 8, 64, 1024, 512), (8192, 1, 8, 512, 896), (1000, 2, 8, 264, 136)])
def test_fused_layer_matches_unfused_on_gpu(shape: tuple[int, int, int, int, int], wgrad: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import moe_fused

    monkeypatch.setitem(moe_fused.OPTIONS, "wgrad", wgrad)
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
        o.y.float().square().mean().backward()
        outs[name] = (o.y.float(), xi.grad, m.experts.w13.grad, m.experts.w2.grad)
    assert fused.experts.last_backend.startswith("fused+"), fused.experts.last_fallback
    for name, a, b in zip(["y", "dx", "dw13", "dw2"], outs["fused"], outs["ref"], strict=True):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g} (bf16)"
