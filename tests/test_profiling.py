"""GPU-time accounting of profiler traces (kernels/profiling.py): overlapping kernels count once."""

from __future__ import annotations

import pytest

from kernels.profiling import KernelSpan, busy_us, category, shares


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
