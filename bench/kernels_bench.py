"""Benchmark of the MoE expert kernels: grouped GEMM backends and the whole MoE FFN layer.

Part "op": one expert projection x (T*k, d) @ w (E, d, f) routed by `offs`, forward and forward +
backward (dx and dw), TFLOP/s = 2*rows*d*f per product (3 products for fwd+bwd), for
- cutlass:   kernels/cutlass_ext.py (SM90 CUTLASS grouped GEMM), with the tile config chosen per
             product (kernels.cutlass_ext.DEFAULT_CHOICE; --sweep adds "auto" and every config);
             --parts kinds times each product (fwd, dx, dw) alone for every config;
- torch:     torch._grouped_mm called directly (its own autograd);
- triton:    the plain grouped GEMM of kernels/moe_fused.py (autotuned Triton);
- loop:      the reference backend (one matmul per expert);
- dense:     one ungrouped GEMM (rows, d) @ (d, f) of the same FLOPs: the ceiling.
Part "layer": moe_study.model.moe.MoE (route, permute, SwiGLU experts, combine; each expert backend,
"fused" = kernels/moe_fused.py: gather, SwiGLU and the gate-weighted combine fused into Triton expert
GEMMs, its plain products on cutlass; options as "fused:combine=atomic", "fused:combine=unfused",
"fused:wgrad=gather" or "fused:gather") vs a dense SwiGLU FFN with the same activated FLOPs (hidden k*f),
in bf16, forward and forward+backward.

Loads are mildly unbalanced: per-expert row counts are the mean +-25% (seeded), as in routing.
Timing: CUDA events around each call, after warm-up, median of --iters repeats.

    python bench/kernels_bench.py --out results/kernels/grouped_gemm_h100.csv

writes the CSV, a Markdown summary beside it (with this exact command), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import cutlass_ext, moe_fused, profiling  # noqa: E402
from kernels import router as fused_router  # noqa: E402
from kernels.grouped_gemm import _CutlassGroupedMM, backend_status, run_backend  # noqa: E402

# (tokens T, top-k, experts E, d_model d, expert hidden f); the first is the goal shape of issue 5
SHAPES = [(16384, 8, 64, 1024, 512), (16384, 2, 8, 1024, 2816), (16384, 4, 32, 1024, 704),
          (65536, 8, 64, 2048, 1024),
          # the MoE layers of bench/train_mfu.py (d512 family at r_a 0.2, 64 x 1024 tokens a step)
          (65536, 1, 8, 512, 896), (65536, 2, 16, 512, 448)]
FIELDS = ["part", "shape", "backend", "config", "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops",
          "vs_torch_fwd_bwd", "vs_dense_fwd_bwd", "vs_dense_fwd", "max_rel_err", "note"]


def shape_name(s: tuple[int, int, int, int, int]) -> str:
    T, k, E, d, f = s
    return f"T{T} top{k}/{E} d{d} f{f}"


def unbalanced_offsets(rows: int, experts: int, seed: int = 0, spread: float = 0.25) -> torch.Tensor:
    """int32 cumulative row ends of counts mean*(1 +- spread), summing to `rows`."""
    g = torch.Generator().manual_seed(seed)
    mean = rows // experts
    counts = (mean + ((torch.rand(experts, generator=g) - 0.5) * 2 * spread * mean)).long()
    counts[-1] = rows - counts[:-1].sum()
    return counts.cumsum(0).to(torch.int32)


# --timing: "eager" times eager calls; each also pays its host work (Python, autograd, launches),
# and where that is longer than the GPU work the GPU waits and the timing measures the host:
# torch._grouped_mm's ~0.2 ms of host time per call on the lent H100 VM is close to its 0.24 ms of
# GPU time at the goal shape, so eager ratios mix kernel speed with host overhead. "graphs" times
# CUDA-graph replays (the kernels and the launch gaps between them, as a graph-captured training
# step sees them); "busy" profiles eager calls and takes the time the GPU was busy per call (the
# union of kernel intervals: kernel time only, for code that cannot be captured).
TIMING = {"mode": "eager", "eager_fallbacks": 0}


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured once in a CUDA graph (after warm-up calls on a side stream, which also run any
    autotuning); returns the replay. Raises if fn cannot be captured (e.g. a host sync)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def busy_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Mean GPU-busy time per call: the union of the CUDA kernel/memset intervals of `iters` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return profiling.busy_us(profiling.kernel_spans(prof)) / iters / 1000.0


def median_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    if TIMING["mode"] == "busy":
        return busy_ms(fn, warmup, iters)
    if TIMING["mode"] == "graphs":
        try:
            fn = graphed(fn)
        except Exception as err:  # e.g. a host sync inside: time it eagerly, and say so in the output
            TIMING["eager_fallbacks"] += 1
            print(f"graph capture failed ({type(err).__name__}: {str(err)[:120]}), timing eager calls",
                  file=sys.stderr)
            torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for a, b in zip(starts, ends, strict=True):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))
    return times[len(times) // 2]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().float(), ref.detach().float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ op part
def op_rows(s: tuple[int, int, int, int, int], warmup: int, iters: int, sweep: bool,
            loop: bool) -> list[dict[str, Any]]:
    T, k, E, d, f = s
    R = T * k
    dev, bf = "cuda", torch.bfloat16
    offs = unbalanced_offsets(R, E).to(dev)
    x = (torch.randn(R, d, device=dev) / d**0.25).to(bf).requires_grad_()
    w = (torch.randn(E, d, f, device=dev) / d**0.25).to(bf).requires_grad_()
    dy = torch.randn(R, f, device=dev, dtype=bf)
    flops = 2.0 * R * d * f
    ref = torch._grouped_mm(x.detach(), w.detach(), offs=offs)

    def measure(name: str, config: str, fwd: Callable[[], torch.Tensor], note: str = "",
                wrt: tuple[torch.Tensor, ...] = (x, w)) -> dict[str, Any]:
        y = fwd()
        err = rel_err(y, ref)
        t_f = median_ms(fwd, warmup, iters)
        t_fb = median_ms(lambda: torch.autograd.grad(fwd(), wrt, dy), warmup, iters)
        return {"part": "op", "shape": shape_name(s), "backend": name, "config": config,
                "fwd_ms": t_f, "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_ms": t_fb,
                "fwd_bwd_tflops": 3 * flops / t_fb / 1e9, "max_rel_err": err, "note": note}

    rows = []
    wd = w.detach()[0].clone().requires_grad_()
    dense = measure("dense", "", lambda: x @ wd, "one (rows,d)@(d,f) GEMM", (x, wd))
    dense["max_rel_err"] = ""
    rows.append(dense)
    rows.append(measure("torch", "", lambda: torch._grouped_mm(x, w, offs=offs), "torch._grouped_mm"))
    problem = backend_status("cuda", bf)["cutlass"]
    if problem is not None:
        rows.append({"part": "op", "shape": shape_name(s), "backend": "cutlass", "note": problem})
    else:
        configs = [None] + (["auto", *cutlass_ext.CONFIGS] if sweep else [])
        for cfg in configs:
            prev = cutlass_ext.choose(**({kk: cfg for kk in cutlass_ext.KINDS} if cfg else {}))
            label = cfg or "default " + "+".join(f"{kk}:{cutlass_ext._choice[kk]}" for kk in cutlass_ext.KINDS)
            rows.append(measure("cutlass", label, lambda: _CutlassGroupedMM.apply(x, w, offs)))
            if cfg == "auto":
                picked = {key[0]: c for key, c in cutlass_ext._tuned.items() if key[1:4] == (E, d, f)}
                rows[-1]["note"] = "autotuned: " + ", ".join(f"{kk}={picked.get(kk)}" for kk in cutlass_ext.KINDS)
            cutlass_ext.choose(**prev)
    if moe_fused.problem(x) is None:
        rows.append(measure("triton", "autotuned", lambda: moe_fused.triton_grouped_mm(x, w, offs),
                            "kernels/moe_fused.py plain grouped GEMM"))
    if loop:
        rows.append(measure("loop", "", lambda: run_backend("reference", x, w, offs), "per-expert matmuls"))
    t_torch = rows[1]["fwd_bwd_ms"]
    for r in rows:
        if "fwd_bwd_ms" in r:
            r["vs_torch_fwd_bwd"] = t_torch / r["fwd_bwd_ms"]
            r["vs_dense_fwd_bwd"] = dense["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["vs_dense_fwd"] = dense["fwd_ms"] / r["fwd_ms"]
    return rows


# ------------------------------------------------------------------------------------ per-product part
def kind_rows(s: tuple[int, int, int, int, int], warmup: int, iters: int) -> list[dict[str, Any]]:
    """Each product alone (fwd, dx, dw) for torch._grouped_mm and every compiled cutlass config:
    the table DEFAULT_CHOICE in kernels/cutlass_ext.py is read off."""
    T, k, E, d, f = s
    R = T * k
    dev, bf = "cuda", torch.bfloat16
    offs = unbalanced_offsets(R, E).to(dev)
    x = torch.randn(R, d, device=dev, dtype=bf)
    w = torch.randn(E, d, f, device=dev, dtype=bf)
    dy = torch.randn(R, f, device=dev, dtype=bf)
    flops = 2.0 * R * d * f
    torch_ops = {"fwd": lambda: torch._grouped_mm(x, w, offs=offs),
                 "dx": lambda: torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs),
                 "dw": lambda: torch._grouped_mm(x.t(), dy, offs=offs)}
    outs = {"fwd": torch.empty(R, f, device=dev, dtype=bf), "dx": torch.empty_like(x), "dw": torch.empty_like(w)}
    args = {"fwd": (x, w), "dx": (dy, w), "dw": (x, dy)}
    ext = cutlass_ext.load()
    rows = []
    for kind in cutlass_ext.KINDS:
        t_torch = median_ms(torch_ops[kind], warmup, iters)
        ref = torch_ops[kind]()
        rows.append({"part": f"op_{kind}", "shape": shape_name(s), "backend": "torch", "config": "",
                     "fwd_ms": t_torch, "fwd_tflops": flops / t_torch / 1e9})
        for cfg in cutlass_ext.CONFIGS:
            name = f"{kind}_{cfg}"
            a, b = args[kind]

            def go(name: str = name, a: torch.Tensor = a, b: torch.Tensor = b, kind: str = kind) -> None:
                ext.run(name, offs, a, b, outs[kind], d, f)

            go()
            err = rel_err(outs[kind], ref)
            t = median_ms(go, warmup, iters)
            rows.append({"part": f"op_{kind}", "shape": shape_name(s), "backend": "cutlass", "config": cfg,
                         "fwd_ms": t, "fwd_tflops": flops / t / 1e9, "vs_torch_fwd_bwd": t_torch / t,
                         "max_rel_err": err, "note": "vs_torch: this product alone"})
    return rows


# --------------------------------------------------------------------------------------- layer part
def layer_rows(s: tuple[int, int, int, int, int], backends: list[str], warmup: int,
               iters: int, compile_: bool = False) -> list[dict[str, Any]]:
    from moe_study.model.layers import SwiGLU
    from moe_study.model.moe import MoE

    T, k, E, d, f = s
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=bf).requires_grad_()
    dy = torch.randn(T, d, device=dev, dtype=bf)
    expert_flops = 3 * 2.0 * T * k * d * f
    rows = []
    dense = SwiGLU(d, k * f).to(dev, bf)

    def measure(name: str, mod: torch.nn.Module, out: Callable[[], torch.Tensor], flops: float,
                note: str = "") -> dict[str, Any]:
        params = [p for p in mod.parameters() if p.requires_grad]
        t_f = median_ms(lambda: out(), warmup, iters)
        t_fb = median_ms(lambda: torch.autograd.grad(out(), [x, *params], dy), warmup, iters)
        return {"part": "layer", "shape": shape_name(s), "backend": name, "config": "",
                "fwd_ms": t_f, "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_ms": t_fb,
                "fwd_bwd_tflops": 3 * flops / t_fb / 1e9, "note": note}

    dense_fn = torch.compile(dense) if compile_ else dense
    d_row = measure("dense_swiglu" + (" compiled" if compile_ else ""), dense, lambda: dense_fn(x), expert_flops,
                    f"SwiGLU d={d} hidden={k * f}")
    rows.append(d_row)
    ref_y = None
    for spec in backends:
        b, opts = parse_backend(spec)
        moe_fused.OPTIONS.update(moe_fused.DEFAULT_OPTIONS, **opts)
        opt = " ".join(f"{key}={value}" for key, value in opts.items())
        torch.manual_seed(1)
        moe = MoE(d, f, E, k, backend=b).to(dev)
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.02)
        moe = moe.to(bf)
        y = moe(x).y
        if not (moe.experts.last_backend or "").startswith(b):  # "fused" runs as "fused+<plain backend>"
            rows.append({"part": "layer", "shape": shape_name(s), "backend": f"moe_{b}",
                         "note": f"fell back: {moe.experts.last_fallback}"})
            continue
        ref_y = y if ref_y is None else ref_y
        name = f"moe_{moe.experts.last_backend}" + (f" {opt}" if opt else "") + f" router={moe.router.last_path}"
        fn = torch.compile(moe) if compile_ else moe
        row = measure(name + (" compiled" if compile_ else ""), moe, lambda fn=fn: fn(x).y,
                      expert_flops + 2.0 * T * d * E, "route+permute+SwiGLU experts+combine")
        row["max_rel_err"] = rel_err(y, ref_y)
        rows.append(row)
    moe_fused.OPTIONS.update(moe_fused.DEFAULT_OPTIONS)
    for r in rows:
        if "fwd_bwd_ms" in r:
            r["vs_dense_fwd_bwd"] = d_row["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["vs_dense_fwd"] = d_row["fwd_ms"] / r["fwd_ms"]
    return rows


def parse_backend(spec: str) -> tuple[str, dict[str, str]]:
    """A layer backend with kernels/moe_fused.py options: "fused:combine=atomic:wgrad=gather" ->
    ("fused", {"combine": "atomic", "wgrad": "gather"}); a bare option is a wgrad mode ("fused:gather",
    the older spelling). Unknown keys or values are errors (a typo must not time the default)."""
    name, *parts = spec.split(":")
    opts: dict[str, str] = {}
    for part in parts:
        key, _, value = part.rpartition("=")
        opts[key or "wgrad"] = value
    allowed = {"wgrad": ("permuted", "gather"), "combine": moe_fused.COMBINE_MODES}
    for key, value in opts.items():
        if value not in allowed.get(key, ()):
            raise ValueError(f"layer backend {spec!r}: option {key}={value} is not one of "
                             f"{ {k: list(v) for k, v in allowed.items()} }")
    return name, opts


# ------------------------------------------------------------------------------------------- output
def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown(rows: list[dict[str, Any]], command: str, machine: str) -> str:
    cols = ["part", "shape", "backend", "config", "fwd_tflops", "fwd_bwd_tflops", "vs_torch_fwd_bwd",
            "vs_dense_fwd_bwd", "fwd_ms", "fwd_bwd_ms", "max_rel_err", "note"]
    out = [f"# MoE expert kernels ({machine})", "", f"`{command}`", "",
           "op: one projection x(T*k,d) @ w(E,d,f), TFLOP/s of 2*T*k*d*f per product (3 for fwd+bwd); "
           "layer: moe_study.model.moe.MoE vs dense SwiGLU of hidden k*f (same expert FLOPs); vs_*: speed ratio "
           "(>1 = faster than torch._grouped_mm / the dense equivalent). " + {
               "eager": "Median of CUDA-event timings of eager calls (includes host overhead where the host "
                        "is slower than the GPU).",
               "graphs": "Median of CUDA-event timings of CUDA-graph replays (kernel time and launch gaps, no "
                         f"host overhead; {TIMING['eager_fallbacks']} timings fell back to eager calls).",
               "busy": "Mean GPU-busy time per call (union of kernel intervals under the profiler: kernel "
                       "time only)."}[TIMING["mode"]], "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/kernels/grouped_gemm.csv")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--shapes", default="0,1,2,3", help="indices into SHAPES")
    ap.add_argument("--parts", default="op,layer")
    ap.add_argument("--sweep", action="store_true", help="also time every cutlass tile config")
    ap.add_argument("--no-loop", action="store_true", help="skip the slow per-expert loop")
    ap.add_argument("--layer-backends", default="fused,cutlass,torch_grouped,reference",
                    help="comma-separated; fused takes kernels/moe_fused.py options as ':key=value' "
                         "(combine=slots|atomic|unfused, wgrad=permuted|gather; ':gather' = wgrad=gather)")
    ap.add_argument("--timing", choices=("eager", "graphs", "busy"), default="eager",
                    help="eager calls; CUDA-graph replays; or GPU-busy time per call (see TIMING)")
    ap.add_argument("--compile", action="store_true",
                    help="layer part: torch.compile the dense FFN and each MoE layer (as training does)")
    ap.add_argument("--router", choices=["eager", "fused"], default=None,
                    help="layer part: the MoE router as eager PyTorch or the Triton kernels of kernels/router.py "
                         f"(default: the model's, kernels.router.OPTIONS = {fused_router.OPTIONS['router']!r}); "
                         "the backend column names the one that ran")
    a = ap.parse_args(argv)
    if a.router is not None:
        fused_router.OPTIONS["router"] = "eager" if a.router == "eager" else "auto"
    for spec in a.layer_backends.split(","):
        try:
            parse_backend(spec)
        except ValueError as err:
            ap.error(str(err))
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    TIMING["mode"] = a.timing
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    p = torch.cuda.get_device_properties(0)
    machine = f"{p.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {platform.node() or 'host'}"
    shapes = [SHAPES[int(i)] for i in a.shapes.split(",")]
    parts = a.parts.split(",")
    rows: list[dict[str, Any]] = []
    for s in shapes:
        printed = len(rows)
        if "kinds" in parts:
            rows += kind_rows(s, a.warmup, a.iters)
        if "op" in parts:
            rows += op_rows(s, a.warmup, a.iters, a.sweep, not a.no_loop)
        if "layer" in parts:
            rows += layer_rows(s, a.layer_backends.split(","), a.warmup, a.iters, a.compile)
        for r in rows[printed:]:
            print(" ".join(f"{c}={fmt(r.get(c))}" for c in FIELDS if r.get(c) not in (None, "")), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, FIELDS)
        wr.writeheader()
        for r in rows:
            wr.writerow({c: fmt(r.get(c)) for c in FIELDS})
    md = markdown(rows, command, machine)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
