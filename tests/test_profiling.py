"""GPU-time accounting of profiler traces (kernels/profiling.py): overlapping kernels count once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels.profiling import KernelSpan, busy_us, category, kernel_spans, shares


def test_busy_time_is_the_union_of_spans() -> None:
    spans = [KernelSpan("a", 0, 10), KernelSpan("b", 5, 12), KernelSpan("c", 20, 25), KernelSpan("d", 21, 22)]
    assert busy_us(spans) == 17  # [0, 12) and [20, 25)
    assert busy_us(list(reversed(spans))) == 17
    assert busy_us([]) == 0


def test_categories_and_shares() -> None:
    assert category("void moe_gg::setup_kernel<...>") == "grouped_gemm"
    assert category("nvjet_sm90_tst_64x128_64x8_1x2_h_bz_TNN") == "gemm"
    assert category("flash_fwd_kernel") == "attention"
    assert category("triton_poi_fused_add_0") == "triton_fused"
    assert category("Memset (Device)") == "memory"
    got = shares([KernelSpan("nvjet_a", 0, 30), KernelSpan("triton_x", 0, 10)])
    assert got == {"gemm": pytest.approx(0.75), "triton_fused": pytest.approx(0.25)}
    assert shares([]) == {}


def test_ranges_mirrored_onto_the_gpu_are_not_work() -> None:
    """A schedule's ProfilerStep and a record_function range appear as CUDA events spanning their kernels:
    counted, the step's gaps became busy time and its length went to `other`."""
    def event(name: str, start: float, end: float, device: str = "CUDA", annotation: bool = False):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               device_type=getattr(torch.autograd.DeviceType, device), is_user_annotation=annotation)

    prof = SimpleNamespace(events=lambda: [
        event("ProfilerStep*", 0, 100), event("step", 0, 100, annotation=True), event("ProfilerStep#3", 0, 100, "CPU"),
        event("triton_x", 50, 60), event("nvjet_a", 10, 40), event("aten::mm", 5, 45, "CPU")])
    spans = kernel_spans(prof)
    assert [s.name for s in spans] == ["nvjet_a", "triton_x"]
    assert busy_us(spans) == 40
    assert shares(spans) == {"gemm": pytest.approx(0.75), "triton_fused": pytest.approx(0.25)}
