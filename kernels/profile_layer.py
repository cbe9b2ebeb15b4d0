"""Where the time of one MoE FFN layer goes (forward + backward), per CUDA kernel, on the GPU.

    python kernels/profile_layer.py --backend cutlass --shape 0
    python kernels/profile_layer.py --backend fused:combine=atomic --shape 0   (moe_fused options as in bench.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import moe_fused  # noqa: E402
from kernels.bench import SHAPES, parse_backend  # noqa: E402
from stages.model import MoE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cutlass")
    ap.add_argument("--shape", type=int, default=0)
    ap.add_argument("--rows", type=int, default=30)
    a = ap.parse_args()
    backend, opts = parse_backend(a.backend)
    moe_fused.OPTIONS.update(opts)
    T, k, E, d, f = SHAPES[a.shape]
    moe = MoE(d, f, E, k, backend=backend).cuda()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        torch.autograd.grad(moe(x).y, [x, *moe.parameters()], dy)

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
            step()
        torch.cuda.synchronize()
    print(f"{a.backend} shape {SHAPES[a.shape]}: {wall_ms:.3f} ms per fwd+bwd (CUDA events, mean of 10)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
