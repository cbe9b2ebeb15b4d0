"""GPU time out of a torch.profiler trace: the kernels that ran, how long the GPU was busy, and what
kind of work it was busy with. Shared by bench/kernels_bench.py (--timing busy), bench/profile_layer.py
(--timeline) and bench/train_mfu.py (profile_gpu_busy, profile_gpu_share).

Why not `prof.key_averages()`: its device times are attributed to every enclosing range too (an
`aten::mm` row carries its GEMM kernel's time, a `record_function` range all of its kernels), so
summing rows counts kernels more than once; here only the device-side events (kernels, memsets,
copies) are read, and overlapping ones (several streams) count once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class KernelSpan(NamedTuple):
    name: str
    start_us: float
    end_us: float


def is_annotation(event: Any) -> bool:
    """Whether a profiler event is a range someone named, not work a device did.

    The profiler mirrors its schedule's steps (`ProfilerStep*`) and `record_function` ranges onto the GPU
    timeline as device events that span the range's kernels. Counted as work, one such range filled the gaps
    between kernels (a step's "busy" time became its span) and put a whole step's length into the `other`
    share (bench/study_step.py's rows before this was excluded)."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name.startswith("ProfilerStep")


def kernel_spans(prof: Any) -> list[KernelSpan]:
    """The device-side work of a finished torch.profiler.profile (kernels, memsets, copies), in start order."""
    spans = [KernelSpan(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and not is_annotation(e)]
    return sorted(spans, key=lambda s: (s.start_us, s.end_us))


def busy_us(spans: list[KernelSpan]) -> float:
    """Time the GPU ran anything: the length of the union of the spans (overlaps count once)."""
    busy, end = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start_us):
        if s.end_us > end:
            busy += s.end_us - max(s.start_us, end)
            end = s.end_us
    return busy


def category(name: str) -> str:
    """A coarse kind of GPU work from a kernel's name (for a training step's time shares)."""
    n = name.lower()
    if "grouped" in n or "group_gemm" in n or "moe_gg" in n:
        return "grouped_gemm"
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "gemm" in n or "cutlass" in n or "nvjet" in n or "xmma" in n or "cublas" in n:
        return "gemm"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if "nccl" in n:
        return "nccl"
    if n.startswith("memset") or n.startswith("memcpy"):
        return "memory"
    if "triton" in n:
        return "triton_fused"
    return "other"


def shares(spans: list[KernelSpan]) -> dict[str, float]:
    """Fraction of summed kernel time per category, largest first."""
    out: dict[str, float] = {}
    for s in spans:
        c = category(s.name)
        out[c] = out.get(c, 0.0) + (s.end_us - s.start_us)
    total = sum(out.values())
    return {k: round(v / total, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])} if total else {}
