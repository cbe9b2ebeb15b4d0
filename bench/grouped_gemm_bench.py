"""Throughput of the grouped-GEMM expert backends (kernels/grouped_gemm.py) at a few MoE shapes.

For each shape (E experts, R routed rows = tokens * top_k, k -> n projection) and each backend
(reference loop, torch._grouped_mm, CUTLASS grouped GEMM), times the forward product and the
forward + backward (dx and dw), with CUDA events (or wall time on CPU), after warm-up, and
reports TFLOP/s (2 R k n per product; 3x that for forward + backward). One dense GEMM of the same
total size is timed as the ceiling a grouped kernel can approach. Routing is a seeded multinomial
draw, so experts get uneven row counts as in training. A backend that fails is skipped with its
reason recorded, never silently.

    python bench/grouped_gemm_bench.py --out results/bench/grouped_gemm.json

writes the JSON (with the exact command and machine info) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.grouped_gemm import BACKENDS, backend_status, run_backend  # noqa: E402

# name: (experts, routed rows, k, n)
GPU_SHAPES = {
    "study-tiny E18 d64 f24": (18, 4096, 64, 24),
    "E8 d1024 f2816": (8, 16384, 1024, 2816),
    "E8 d4096 f14336 (Mixtral-like)": (8, 16384, 4096, 14336),
    "E64 d2048 f1408 (fine-grained)": (64, 65536, 2048, 1408),
}
CPU_SHAPES = {
    "study-tiny E18 d64 f24": (18, 4096, 64, 24),
    "study E5 d64 f88": (5, 4096, 64, 88),
    "E8 d256 f512": (8, 4096, 256, 512),
}


def routed_offsets(experts: int, rows: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.multinomial(torch.full((experts,), 1.0), rows, replacement=True, generator=g),
                            minlength=experts)
    return counts.cumsum(0).to(torch.int32).to(device)


def sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: str, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def fwd_bwd_fn(backend: str | None, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> Any:
    """Forward + backward (dx and dw) of one backend, or of one dense GEMM when backend is None."""
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn(x.shape[0], w.shape[2], device=x.device, dtype=x.dtype)

    def run() -> None:
        y = xg @ wg[0] if backend is None else run_backend(backend, xg, wg, offs)
        y.backward(dy)

    return run


def bench_shape(name: str, shape: tuple[int, int, int, int], backends: list[str], device: str,
                dtype: torch.dtype, warmup: int, iters: int) -> dict[str, Any]:
    E, R, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(R, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
    w = (torch.randn(E, k, n, generator=g) / k**0.5).to(device=device, dtype=dtype)
    offs = routed_offsets(E, R, 1, device)
    counts = torch.diff(offs.cpu(), prepend=torch.zeros(1, dtype=torch.int32)).tolist()
    flops = 2.0 * R * k * n
    row: dict[str, Any] = {"shape": name, "experts": E, "rows": R, "k": k, "n": n,
                           "rows_min": min(counts), "rows_max": max(counts), "results": {}}
    ref_out = run_backend("reference", x.float(), w.float(), offs)
    candidates = [("dense_gemm_ceiling", None)] + [(b, b) for b in backends]
    for label, backend in candidates:
        entry: dict[str, Any] = {}
        try:
            if backend is None:
                a, bmat = x, w[0]
                fwd = lambda a=a, bmat=bmat: a @ bmat  # noqa: E731
            else:
                problem = backend_status(device, dtype)[backend]
                if problem is not None:
                    raise RuntimeError(problem)
                t0 = time.perf_counter()
                out = run_backend(backend, x, w, offs)  # first call: compile / plan (timed apart)
                sync(device)
                entry["first_call_s"] = round(time.perf_counter() - t0, 3)
                err = (out.float() - ref_out).abs().max().item() / max(ref_out.abs().max().item(), 1e-12)
                entry["max_rel_error_vs_fp32_reference"] = err
                if err > 5e-2:
                    raise RuntimeError(f"wrong result (max relative error {err:.3g})")
                fwd = lambda b=backend: run_backend(b, x, w, offs)  # noqa: E731
            t = timed(fwd, device, warmup, iters)
            entry["fwd_ms"] = sig(t * 1e3)
            entry["fwd_tflops"] = sig(flops / t / 1e12)
            t = timed(fwd_bwd_fn(backend, x, w, offs), device, warmup, iters)
            entry["fwd_bwd_ms"] = sig(t * 1e3)
            entry["fwd_bwd_tflops"] = sig(3 * flops / t / 1e12)
        except Exception as err:  # a failing backend is reported, not fatal
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            entry = {"skipped": f"{type(err).__name__}: {msg}"[:300]}
        row["results"][label] = entry
        print(f"{name:34s} {label:20s} " + (
            f"fwd {entry['fwd_tflops']:9.4g} TFLOP/s  fwd+bwd {entry['fwd_bwd_tflops']:9.4g} TFLOP/s"
            if "fwd_tflops" in entry else f"skipped: {entry['skipped']}"), flush=True)
    return row


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    try:
        import importlib.metadata as md

        info["nvidia_cutlass"] = md.version("nvidia-cutlass")
    except Exception:
        info["nvidia_cutlass"] = None
    return info


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    dev = m.get("gpu", f"CPU ({m['cpu']}, {m['threads']} threads)")
    lines = [f"# Grouped GEMM backends ({report['dtype']}, {dev})", "",
             f"`{report['command']}`", "",
             "TFLOP/s (2·rows·k·n per product; fwd+bwd counts 3 products). `dense_gemm_ceiling` is one "
             "ungrouped GEMM of the same total size.", "",
             "| shape | E | rows | k→n | backend | fwd TFLOP/s | fwd+bwd TFLOP/s | first call s |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in report["rows"]:
        for b, e in r["results"].items():
            if "skipped" in e:
                lines.append(f"| {r['shape']} | {r['experts']} | {r['rows']} | {r['k']}→{r['n']} | {b} | "
                             f"skipped: {e['skipped'][:120]} | | |")
            else:
                lines.append(f"| {r['shape']} | {r['experts']} | {r['rows']} | {r['k']}→{r['n']} | {b} | "
                             f"{e['fwd_tflops']:.4g} | {e['fwd_bwd_tflops']:.4g} | {e.get('first_call_s', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/grouped_gemm.json")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--shapes", default=None, help="comma-separated subset of the shape names (prefix match)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(argv)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = a.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if a.shapes:
        wanted = [s.strip() for s in a.shapes.split(",")]
        shapes = {k: v for k, v in shapes.items() if any(k.startswith(w) for w in wanted)}
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        ap.error(f"unknown backends {unknown}; choose from {BACKENDS}")
    report: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "device": device, "dtype": dtype_name, "warmup": a.warmup, "iters": a.iters,
        "backend_status": backend_status(device, dtype), "rows": [],
    }
    for name, shape in shapes.items():
        report["rows"].append(bench_shape(name, shape, backends, device, dtype, a.warmup, a.iters))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
