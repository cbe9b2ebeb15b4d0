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


# ------------------------------------------------------------------------------------------- GPU
def _gpu_backend_or_skip(name: str, dtype: torch.dtype) -> None:
    if not CUDA:
        pytest.skip("needs CUDA")
    reason = backend_status("cuda", dtype)[name]
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch_grouped", "cutlass"])
@pytest.mark.parametrize("sizes", [[64, 0, 200, 37], [512] * 8])
def test_gpu_backend_matches_reference(name: str, sizes: list[int]) -> None:
    dtype = torch.bfloat16
    _gpu_backend_or_skip(name, dtype)
    x, w, offs = make(sizes, k=256, n=128, dtype=dtype, device="cuda")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    # reference in float32 on the same bf16 inputs: the tolerance is the bf16 rounding of the output
    y_ref = run_backend("reference", xs[0].float(), ws[0].float(), offs)
    y = run_backend(name, xs[1], ws[1], offs)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-1)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g.to(dtype))
    torch.testing.assert_close(xs[1].grad.float(), xs[0].grad.float(), rtol=2e-2, atol=2e-1)
    torch.testing.assert_close(ws[1].grad.float(), ws[0].grad.float(), rtol=2e-2, atol=1.0)
    assert sizes[1] != 0 or torch.count_nonzero(ws[1].grad[1]) == 0


@pytest.mark.gpu
def test_gpu_auto_is_torch_grouped_in_bf16() -> None:
    _gpu_backend_or_skip("torch_grouped", torch.bfloat16)
    x, w, _ = make([8, 8], k=64, n=64, dtype=torch.bfloat16, device="cuda")
    assert resolve_backend("auto", x, w) == ("torch_grouped", None)
