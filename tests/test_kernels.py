"""Grouped GEMM backends: the reference loop against plain per-expert maths, gradients, empty
experts, validation, fallbacks, and the fused backends against the reference where they run."""

from __future__ import annotations

import pytest
import torch

from kernels import (
    GroupedGemmError,
    available_backends,
    backend_status,
    grouped_mm,
    resolve_backend,
    run_backend,
)

CUDA = torch.cuda.is_available()


def make(rows_per_expert: list[int], k: int, n: int, dtype: torch.dtype = torch.float64,
         device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = sum(rows_per_expert)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.randn(len(rows_per_expert), k, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    offs = torch.tensor(rows_per_expert, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    return x, w, offs


def dense_per_expert(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The definition, row by row: row r belongs to the expert whose range contains r."""
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.einsum("rk,rkn->rn", x, w[owner])


@pytest.mark.parametrize("sizes", [[3, 5, 2], [0, 4, 0, 6], [7], [0, 0, 5], [1, 1, 1, 1, 1, 1, 1, 1]])
def test_reference_matches_dense_definition(sizes: list[int]) -> None:
    x, w, offs = make(sizes, k=6, n=4)
    y = grouped_mm(x, w, offs, backend="reference")
    torch.testing.assert_close(y, dense_per_expert(x, w, sizes), rtol=1e-12, atol=1e-12)


def test_reference_gradcheck_float64() -> None:
    x, w, offs = make([2, 0, 3, 1], k=3, n=2)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offs, "reference"), (x, w))


def test_gradients_match_dense_definition() -> None:
    sizes = [4, 0, 3, 5]
    x, w, offs = make(sizes, k=5, n=3)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(sum(sizes), 3, dtype=torch.float64)
    grouped_mm(x1, w1, offs, "reference").backward(g)
    dense_per_expert(x2, w2, sizes).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    assert torch.count_nonzero(w1.grad[1]) == 0  # an expert with no rows gets no gradient


def test_all_experts_empty() -> None:
    x, w, offs = make([0, 0, 0], k=4, n=2)
    w.requires_grad_()
    y = grouped_mm(x, w, offs, "reference")
    assert y.shape == (0, 2)
    y.sum().backward()
    assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize(
    "offs, match",
    [
        (torch.tensor([2, 5, 4], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([2, 3, 4], dtype=torch.int32), "must equal the number of rows"),
        (torch.tensor([2, 3, 5], dtype=torch.int64), "int32"),
        (torch.tensor([2, 5], dtype=torch.int32), "one end per expert"),
    ],
)
def test_bad_offsets_are_clear_errors(offs: torch.Tensor, match: str) -> None:
    x, w, _ = make([2, 1, 2], k=4, n=2)
    with pytest.raises(GroupedGemmError, match=match):
        grouped_mm(x, w, offs, "reference")


def test_bad_shapes_and_backend_names() -> None:
    x, w, offs = make([2, 1, 2], k=4, n=2)
    with pytest.raises(GroupedGemmError, match="k=3"):
        grouped_mm(x[:, :3], w, offs)
    with pytest.raises(GroupedGemmError, match="unknown grouped GEMM backend"):
        grouped_mm(x, w, offs, backend="magic")


def test_auto_is_reference_on_cpu_and_status_lists_reasons() -> None:
    x, w, _ = make([2, 2], k=8, n=8, dtype=torch.float32)
    assert resolve_backend("auto", x, w) == ("reference", None)
    status = backend_status("cpu", torch.float32)
    assert status["reference"] is None
    assert "CUDA" in status["cutlass"]
    assert available_backends("cpu", torch.float32)[0] == "reference"


def test_unsupported_request_falls_back_with_a_reason() -> None:
    x, w, offs = make([2, 3], k=5, n=4, dtype=torch.float32)  # 5 * 4 bytes: not 16-byte aligned
    name, why = resolve_backend("torch_grouped", x, w)
    assert name == "reference" and "16-byte" in why
    x64, w64, _ = make([2, 3], k=8, n=8)
    name, why = resolve_backend("torch_grouped", x64, w64)
    assert name == "reference" and "float64" in why
    name, why = resolve_backend("cutlass", x, w)
    assert name == "reference" and "CUDA" in why
    # the fallback still computes the right thing
    torch.testing.assert_close(grouped_mm(x, w, offs, "torch_grouped"), dense_per_expert(x, w, [2, 3]))


def test_autocast_casts_operands() -> None:
    x, w, offs = make([3, 5], k=8, n=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, offs, "reference")
    assert y.dtype == torch.bfloat16


def _torch_grouped_cpu(dtype: torch.dtype) -> str | None:
    return backend_status("cpu", dtype)["torch_grouped"]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_torch_grouped_cpu_matches_reference(dtype: torch.dtype, tol: float) -> None:
    reason = _torch_grouped_cpu(dtype)
    if reason is not None:
        pytest.skip(reason)
    sizes = [5, 0, 11, 16]
    x, w, offs = make(sizes, k=16, n=24, dtype=dtype)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    y_ref = run_backend("reference", xs[0], ws[0], offs)
    y = run_backend("torch_grouped", xs[1], ws[1], offs)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    # y.sum() gives a stride-0 gradient, which torch._grouped_mm's own backward rejects
    y_ref.float().sum().backward()
    y.float().sum().backward()
    torch.testing.assert_close(xs[1].grad.float(), xs[0].grad.float(), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(ws[1].grad.float(), ws[0].grad.float(), rtol=tol, atol=tol * 8)


def test_backend_choice_is_a_constant_inside_compiled_graphs() -> None:
    """torch.compile traced the cached torch._grouped_mm probe on every compile (Dynamo ignores
    functools.cache) and broke the graph at its torch.Generator: every MoE layer compiled in pieces.
    Once probed, the choice folds into the graph: no break. Before, the probe runs eagerly, once."""
    from torch._dynamo.utils import counters

    import kernels.grouped_gemm as gg

    reason = _torch_grouped_cpu(torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    x, w = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(2, 16, 16, dtype=torch.bfloat16)

    def scaled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * 2 if resolve_backend("torch_grouped", x, w)[0] == "torch_grouped" else x * 3

    def breaks_compiling() -> int:  # Dynamo's own count (torch._dynamo.explain missed these breaks)
        counters.clear()
        torch._dynamo.reset()
        torch.compile(scaled, backend="eager")(x, w)  # Dynamo alone: the breaks are its own
        return sum(counters["graph_break"].values())

    gg._PROBED.clear()
    breaks_compiling()  # the first compile probes eagerly (a break in each frame down to the probe)
    assert list(gg._PROBED.items()) == [(("cpu", torch.bfloat16), None)]  # probed once, eagerly
    assert breaks_compiling() == 0
    torch.testing.assert_close(torch.compile(scaled, backend="eager")(x, w), x * 2)


def test_compiled_moe_layer_probes_once_and_compiles_only_on_its_first_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled MoE layer whose first call meets a cold probe: the probe runs once, eagerly, and the
    later calls compile nothing more (a recompile after the first step could land in the CUDA-graph
    capture of moe_study/train/cudagraph.py, which the first `warmup` eager steps precede). Once
    warm, no graph break comes from the probe (its torch.Generator, or the eager call itself)."""
    from torch._dynamo.utils import counters

    import kernels.grouped_gemm as gg
    from moe_study.model.moe import MoE

    reason = _torch_grouped_cpu(torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    probes = []
    real_probe = gg._torch_grouped_probe
    monkeypatch.setattr(gg, "_torch_grouped_probe", lambda *a: probes.append(a) or real_probe(*a))
    torch.manual_seed(0)
    layer = MoE(64, 32, 4, 2, backend="torch_grouped").to(torch.bfloat16)
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)

    gg._PROBED.clear()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="eager")
    graphs = []
    for _ in range(4):
        compiled(x).y.float().sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert probes == [("cpu", torch.bfloat16)]
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 3, graphs

    torch._dynamo.reset()
    counters.clear()
    torch.compile(layer, backend="eager")(x)
    reasons = " ".join(counters["graph_break"])
    assert "Generator" not in reasons and "_probe_eagerly" not in reasons, reasons
    assert probes == [("cpu", torch.bfloat16)]


# ------------------------------------------------------- reference: odd sizes, one row, fp32 and bf16
CASES = [[64, 0, 200, 37], [1], [0, 1, 0], [3, 5, 2], [0, 0, 13, 0, 7], [512] * 8]


@pytest.mark.parametrize("sizes", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_reference_fwd_and_grads_vs_dense_maths(sizes: list[int], dtype: torch.dtype, tol: float) -> None:
    """Forward, dx and dw of the loop against per-row dense maths in float64 (odd row counts,
    empty experts, a single row), in the training dtypes."""
    x, w, offs = make(sizes, k=24, n=40, seed=sum(sizes))
    g = torch.randn(sum(sizes), 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x1, w1 = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    y = grouped_mm(x1, w1, offs, "reference")
    y.backward(g.to(dtype))
    x2, w2 = x1.detach().double().requires_grad_(), w1.detach().double().requires_grad_()
    dense_per_expert(x2, w2, sizes).backward(g.to(dtype).double())
    scale = max(1.0, float(y.detach().abs().max()))
    torch.testing.assert_close(y.double(), dense_per_expert(x2.detach(), w2.detach(), sizes), rtol=tol,
                               atol=tol * scale)
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=tol, atol=tol * float(x2.grad.abs().max() + 1))
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=tol, atol=tol * float(w2.grad.abs().max() + 1))
    for e, m in enumerate(sizes):
        if m == 0:
            assert torch.count_nonzero(w1.grad[e]) == 0


# ------------------------------------------------------------------------------------------- GPU
def _gpu_backend_or_skip(name: str, dtype: torch.dtype) -> None:
    if not CUDA:
        pytest.skip("needs CUDA")
    reason = backend_status("cuda", dtype)[name]
    if reason is not None:
        pytest.skip(reason)


def _poison_allocator(numel: int) -> None:
    """Leave NaN-filled blocks in torch's caching allocator, so an output the kernel forgets to
    write (e.g. dw of an expert without rows) comes back as NaN rather than a lucky zero."""
    junk = [torch.full((numel,), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    del junk


def _check_backend_vs_reference(name: str, sizes: list[int], k: int, n: int, seed: int = 0) -> None:
    dtype = torch.bfloat16
    x, w, offs = make(sizes, k=k, n=n, dtype=dtype, device="cuda", seed=seed)
    x, w = x / k**0.25, w / k**0.25
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    # reference in float32 on the same bf16 inputs: the tolerance is the bf16 rounding of the output
    y_ref = run_backend("reference", xs[0].float(), ws[0].float(), offs)
    _poison_allocator(max(x.numel(), w.numel(), sum(sizes) * n) + 1024)
    y = run_backend(name, xs[1], ws[1], offs)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    _poison_allocator(max(x.numel(), w.numel()) + 1024)
    y.backward(g.to(dtype))

    def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
        err = float((a.float() - b).norm() / b.norm().clamp_min(1e-12)) if b.numel() else 0.0
        assert err < 1e-2, f"{what}: relative error {err:.3g}"

    close(y, y_ref, "y")
    close(xs[1].grad, xs[0].grad, "dx")
    close(ws[1].grad, ws[0].grad, "dw")
    for e, m in enumerate(sizes):
        if m == 0:
            assert torch.count_nonzero(ws[1].grad[e]) == 0, f"dw of empty expert {e} is not zero"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch_grouped", "cutlass"])
@pytest.mark.parametrize("sizes", CASES)
def test_gpu_backend_matches_reference(name: str, sizes: list[int]) -> None:
    _gpu_backend_or_skip(name, torch.bfloat16)
    _check_backend_vs_reference(name, sizes, k=256, n=136)  # n=136: 16-byte rows, not a tile multiple


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 1024, 512, 2048), (8, 1024, 2816, 4096), (32, 2048, 1024, 1500)])
def test_gpu_cutlass_large_shapes(shape: tuple[int, int, int, int]) -> None:
    _gpu_backend_or_skip("cutlass", torch.bfloat16)
    E, k, n, mean = shape
    g = torch.Generator().manual_seed(E)
    sizes = [int(mean * (0.75 + 0.5 * float(torch.rand(1, generator=g)))) for _ in range(E)]
    sizes[1] = 0  # an empty expert among large ones
    sizes[2] = 13  # and a tiny odd one
    _check_backend_vs_reference("cutlass", sizes, k=k, n=n, seed=E)


@pytest.mark.gpu
def test_gpu_cutlass_every_config() -> None:
    _gpu_backend_or_skip("cutlass", torch.bfloat16)
    from kernels import cutlass_ext

    for cfg in cutlass_ext.CONFIGS:
        prev = cutlass_ext.choose(fwd=cfg, dx=cfg, dw=cfg)
        try:
            _check_backend_vs_reference("cutlass", [300, 0, 1, 129, 1024], k=512, n=264, seed=3)
        finally:
            cutlass_ext.choose(**prev)


@pytest.mark.gpu
def test_gpu_auto_is_torch_grouped_in_bf16() -> None:
    _gpu_backend_or_skip("torch_grouped", torch.bfloat16)
    x, w, _ = make([8, 8], k=64, n=64, dtype=torch.bfloat16, device="cuda")
    assert resolve_backend("auto", x, w) == ("torch_grouped", None)


# ------------------------------------------------------------------------- cutlass extension (CPU)
def test_cutlass_extension_says_why_it_cannot_run_and_generates_one_unit_per_config() -> None:
    from kernels import cutlass_ext

    if not CUDA:
        with pytest.raises(cutlass_ext.CutlassUnavailable, match="CUDA GPU"):
            cutlass_ext.load()
        assert "CUDA GPU" in cutlass_ext.problem()
    src = cutlass_ext.unit_source("dw", "c128x256c12")
    assert "MOE_GG_REGISTER(DW, Tile_, Cluster_, Coop, \"dw_c128x256c12\")" in src
    assert "cute::Shape<cute::_128, cute::_256, cute::_64>" in src and "cute::_1, cute::_2, cute::_1" in src
    for kind, cfg in cutlass_ext.DEFAULT_CHOICE.items():
        assert kind in cutlass_ext.KINDS and cfg in cutlass_ext.CONFIGS
    with pytest.raises(ValueError, match="configs"):
        cutlass_ext.choose(fwd="c1x1")
    prev = cutlass_ext.choose(dx="auto")
    assert cutlass_ext.choose(**prev)["dx"] == "auto"


def test_kill_switch_keeps_the_first_reason_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kernels.triton_env import KillSwitch

    switch = KillSwitch(logging.getLogger("test.kill_switch"), "the fast path", "the eager one")
    assert not switch and switch.reason is None
    with caplog.at_level(logging.WARNING, logger="test.kill_switch"):
        first = switch.trip("kernel_a", RuntimeError("no sm_90 here"))
        assert switch.trip("kernel_b", ValueError("later")) == first
    assert switch and first == "kernel_a: RuntimeError: no sm_90 here"
    assert len(caplog.records) == 1 and "the eager one" in caplog.records[0].getMessage()
    switch.reset()
    assert not switch
