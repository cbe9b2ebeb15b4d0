"""Where the time of one MoE FFN layer (or one grouped-GEMM op) goes, forward + backward, per CUDA
kernel, on the GPU; --timeline also lists one step's kernels in start order with the idle gaps
between them (launch latency, the setup kernels, tails of persistent kernels).

    python bench/profile_layer.py --backend cutlass --shape 0
    python bench/profile_layer.py --part op --backend cutlass --shape 0 --timeline
    python bench/profile_layer.py --backend fused:combine=atomic --shape 0   (moe_fused options as in bench.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels_bench import SHAPES, parse_backend, unbalanced_offsets  # noqa: E402

from kernels import grouped_gemm, moe_fused, profiling  # noqa: E402
from kernels import router as fused_router  # noqa: E402
from moe_study.model.moe import MoE  # noqa: E402


def layer_step(spec: str, shape: tuple[int, int, int, int, int]) -> Callable[[], None]:
    """One MoE layer fwd+bwd; spec is an expert backend with moe_fused options ("fused:combine=atomic")."""
    backend, opts = parse_backend(spec)
    moe_fused.OPTIONS.update(moe_fused.DEFAULT_OPTIONS, **opts)
    T, k, E, d, f = shape
    moe = MoE(d, f, E, k, backend=backend).cuda()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    return lambda: torch.autograd.grad(moe(x).y, [x, *moe.parameters()], dy)


def op_step(backend: str, shape: tuple[int, int, int, int, int]) -> Callable[[], None]:
    """One projection x (T*k, d) @ w (E, d, f) fwd+bwd, as in bench/kernels_bench.py's op part."""
    T, k, E, d, f = shape
    offs = unbalanced_offsets(T * k, E).cuda()
    x = torch.randn(T * k, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(E, d, f, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(T * k, f, device="cuda", dtype=torch.bfloat16)
    if backend == "torch":
        return lambda: torch.autograd.grad(torch._grouped_mm(x, w, offs=offs), (x, w), dy)
    return lambda: torch.autograd.grad(grouped_gemm.run_backend(backend, x, w, offs), (x, w), dy)


def timeline(prof: torch.profiler.profile) -> list[str]:
    """The last step's device events in start order: start, duration and the gap before each (us)."""
    spans = profiling.kernel_spans(prof)
    marks = [e for e in prof.events() if e.name == "step"]
    if marks:  # from the last step's host-side start on (the GPU may still be finishing the one before)
        last = max(e.time_range.start for e in marks)
        spans = [s for s in spans if s.start_us >= last] or spans
    if not spans:
        return []
    t0 = spans[0].start_us
    lines, prev_end = [], t0
    for s in spans:
        lines.append(f"{s.start_us - t0:9.1f} us  {s.end_us - s.start_us:8.1f} us  gap {s.start_us - prev_end:7.1f}"
                     f"  {s.name[:90]}")
        prev_end = max(prev_end, s.end_us)
    lines.append(f"span {prev_end - t0:.1f} us, GPU busy {profiling.busy_us(spans):.1f} us")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("layer", "op"), default="layer")
    ap.add_argument("--backend", default="cutlass", help="an expert backend (layer) or cutlass/torch (op)")
    ap.add_argument("--shape", type=int, default=0)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--router", choices=["eager", "fused"], default=None,
                    help="layer part: the router as eager PyTorch or kernels/router.py (default: the model's)")
    a = ap.parse_args()
    if a.router is not None:
        fused_router.OPTIONS["router"] = "eager" if a.router == "eager" else "auto"
    shape = SHAPES[a.shape]
    step = (op_step if a.part == "op" else layer_step)(a.backend, shape)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        step()
    end.record()
    torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            with torch.profiler.record_function("step"):
                step()
        torch.cuda.synchronize()
    router = f", router option {fused_router.OPTIONS['router']!r}" if a.part == "layer" else ""
    busy = profiling.busy_us(profiling.kernel_spans(prof)) / 5 / 1000
    print(f"{a.part} {a.backend} shape {shape}{router}: {wall_ms:.3f} ms per fwd+bwd (CUDA events, mean of 10), "
          f"GPU busy {busy:.3f} ms per fwd+bwd (profiled)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))
    if a.timeline:
        print("\n".join(timeline(prof)))


if __name__ == "__main__":
    main()
