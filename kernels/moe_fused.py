"""Fused MoE expert block: the dispatch gather folded into the first grouped GEMM's A load, SwiGLU in
its epilogue, the SwiGLU backward in the epilogue of the down projection's input-gradient GEMM, and
(OPTIONS["combine"], off by default: measured slower) the gate-weighted combine (un-permutation) in the
down projection's epilogue with the gate-weight gradient in that input-gradient GEMM's epilogue.

The unfused path (kernels/experts.py with the `cutlass`/`torch_grouped` backends) runs
    x_perm = permute(x)          (P, d) written          h13 = x_perm @ w13[e]      (P, 2f) written
    act = swiglu(h13)            (P, 2f) read again      y_perm = act @ w2[e]       (P, d) written
    y = unpermute(y_perm, w)     (P, d) gathered back
and in the backward dy_perm = w * dy and d_w = <dy, y_perm> (unpermute's backward reads y_perm again),
dact = dy_perm @ w2[e]^T is written and read back by the SwiGLU backward. At T=16384 tokens, top-8
of 64, d=1024, f=512 those extra passes are ~1 GB of HBM traffic per layer step
(results/kernels/profile_moe_layer_h100.txt). Here (P = T*k routed rows, sorted by expert; row p
is slot s = order[p] of token t = src[p], gate weight w_s):

    forward   h13, act = gather(x, src) @ w13[e]  -> silu(h13[:, :f]) * h13[:, f:]   (Triton, one kernel)
              ys[s]    = w_s * (act @ w2[e])[p]      stored at its slot of a (T*k, d) token-major buffer
              y[t]     = sum_j ys[t*k + j]           (one contiguous fp32-accumulated sum; OPTIONS
                                                     combine="atomic": fp32 atomics into y instead)
    backward  g        = gather(dy, src) @ w2[e]^T  (Triton, one kernel, epilogue:)
                 d_w_s = <act[p], g[p]>  (= <dy[t], (act @ w2[e])[p]>, per-tile partial sums, no atomics)
                 dh13  = swiglu'(h13) * (w_s g)
              dw2      = act^T dy_perm, dy_perm[p] = w_s dy[t]  (weighted scatter, kernels.permute)
              dx_perm  = dh13 @ w13[e]^T,  dx = sum of each token's k rows of dx_perm   (kernels.permute)
              dw13     = gather(x, src)^T dh13                   (plain GEMM on re-gathered x, or Triton)

"Plain grouped GEMM" is the CUTLASS extension where it runs, else torch._grouped_mm. The Triton
kernels walk the experts' row ranges in BM-row tiles found on the device from `offs` (no host sync).
OPTIONS["combine"] = "unfused" (the default: measured faster, see DEFAULT_OPTIONS) keeps the plain down
projection and kernels.permute.unpermute.

Everything here runs only on CUDA with Triton; tests run the same kernels on CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1) against the unfused reference maths (tests/test_moe_fused.py).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from kernels.grouped_gemm import product
from kernels.permute import pow2_at_least, scatter_weighted, sum_slots, unpermute
from kernels.triton_env import KillSwitch, interpreting

log = logging.getLogger("kernels.moe_fused")

# (BM, BN, BK, warps, stages) tried by the autotuner on CUDA; the first is the interpreter's.
GMM_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
               (128, 64, 64, 4, 4), (64, 256, 64, 8, 3)]
SWIGLU_CONFIGS = [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                  (64, 64, 64, 4, 4)]
# (BK_out, BN, BR, warps, stages) for the weight gradient: a (BK_out, BN) tile of dw[e], BR rows a step
WGRAD_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                 (256, 128, 64, 8, 3)]
# wgrad "permuted": dw13 = x_perm^T dh13 re-gathers x_perm and runs the plain (CUTLASS) weight-gradient
# GEMM; "gather": the Triton kernel gathering rows inside (no x_perm, but one program per (expert,
# tile) without split-K: few-expert shapes leave SMs idle). Measured: results/kernels/.
# combine (the gate-weighted sum over each token's k expert rows, kernels.permute.unpermute when unfused):
# "slots": in the down projection's epilogue, each row scaled by its gate weight and stored at its
# (token, slot) place, then the k rows of a token summed (deterministic); "atomic": the epilogue adds
# the scaled rows into a (T, d) fp32 output with atomics (no (T*k, d) buffer; summation order not
# reproducible on a GPU); "unfused" (default): the plain (CUTLASS) down projection, then
# kernels.permute.unpermute. Measured on an H100 (results/kernels/moe_layer_busy_h100.md, GPU-busy time per
# layer fwd+bwd): slots 2-6% and atomic 8-14% slower than unfused at all three benchmark shapes: the
# Triton down projection costs more than the combine passes it saves.
DEFAULT_OPTIONS = {"wgrad": "permuted", "combine": "unfused"}
OPTIONS = dict(DEFAULT_OPTIONS)
COMBINE_MODES = ("slots", "atomic", "unfused")
INTERPRET_CONFIG = {"gmm": (32, 32, 32, 4, 1), "wgrad": (32, 32, 32, 4, 1)}
# the combine's down projection (EPI 3) and the dact GEMM with the gate-gradient epilogue (EPI 4); every one
# compiles for sm_90 without register spills (tests/test_moe_fused.py), unlike GMM_CONFIGS' widest tiles in EPI 4
COMBINE_CONFIGS = GMM_CONFIGS
DACT_CONFIGS = [*SWIGLU_CONFIGS, (64, 256, 64, 8, 3)]
# the narrowest N tile of any config: the column count of combine_dact's partial gate-gradient buffer
MIN_BN = min(c[1] for c in [*DACT_CONFIGS, INTERPRET_CONFIG["gmm"]])


try:  # Triton is optional: CPU-only installs (CI) run the eager paths
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    @triton.jit
    def tile_of(offs_ptr, E, pid_m, BM: tl.constexpr, EP: tl.constexpr):
        """(expert, first row, end row) of the pid_m-th tile when every expert's rows [offs[e-1],
        offs[e]) are cut into BM-row tiles in expert order; expert == E past the last tile."""
        e = tl.arange(0, EP)
        ends = tl.load(offs_ptr + e, mask=e < E, other=0)
        starts = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
        tiles = tl.where(e < E, (ends - starts + BM - 1) // BM, 0)
        cum = tl.cumsum(tiles, 0)
        expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
        first = tl.sum(tl.where(e == expert, cum - tiles, 0), 0)
        row0 = tl.sum(tl.where(e == expert, starts, 0), 0) + (pid_m - first) * BM
        row_end = tl.sum(tl.where(e == expert, ends, 0), 0)
        return expert, row0, row_end

    @triton.jit
    def source_rows(src_ptr, rows, rmask, GATHER: tl.constexpr):
        """int64 rows of the A operand for the permuted rows `rows`: src[rows] when gathering."""
        if GATHER:
            return tl.load(src_ptr + rows, mask=rmask, other=0).to(tl.int64)
        return rows.to(tl.int64)

    @triton.jit
    def swiglu_bwd_store(da, h_ptrs, c_ptrs, m2, N):
        """dh13 = [da * u * silu'(g) | da * silu(g)] of the (g, u) pair of h13 at h_ptrs (and + N)."""
        g = tl.load(h_ptrs, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(h_ptrs + N, mask=m2, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(c_ptrs, (da * u * s * (1.0 + g * (1.0 - s))).to(c_ptrs.dtype.element_ty), mask=m2)
        tl.store(c_ptrs + N, (da * g * s).to(c_ptrs.dtype.element_ty), mask=m2)

    @triton.jit
    def gmm(a_ptr, src_ptr, b_ptr, c_ptr, act_ptr, h_ptr, offs_ptr, slot_ptr, gw_ptr, pw_ptr, E, N, K, topk,
            stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_hm, stride_pw,
            EP: tl.constexpr, GATHER: tl.constexpr, EPI: tl.constexpr, ATOMIC: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """C[p] = A[src[p] if GATHER else p] @ B[expert of p] over an (BM, BN) output tile.
        EPI 0: C = acc.  EPI 1 (SwiGLU forward, N = f, B = w13 (K, 2f)): C = [g | u] (the 2f-wide
        h13) and act = silu(g) * u, with g, u the gate and up accumulators.  EPI 2 (SwiGLU backward,
        N = f): acc = dact, h = h13; C = dh13 = [dact * u * silu'(g) | dact * silu(g)].
        EPI 3 (combine, A = act, N = d): row p is (token, slot) s = slot[p] with gate weight gw[s];
        gw[s] * acc goes to row s of C (T*k, N) or, ATOMIC, is atomically added to row s // topk of
        C (T, N) fp32.  EPI 4 (combine backward, A = dout gathered by token, B = w2 read transposed,
        N = f): acc = dout[t] @ w2[e]^T; writes the partial gate-weight gradient sum_cols act * acc
        to pw[s, pid_n] and C = dh13 of EPI 2 with dact = gw[s] * acc."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        expert, row0, row_end = tile_of(offs_ptr, E, pid_m, BM, EP)
        if expert >= E:
            return
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        arows = source_rows(src_ptr, rows, rmask, GATHER)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < N
        ks = tl.arange(0, BK)
        a_ptrs = a_ptr + arows[:, None] * stride_am + ks[None, :]
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kmask = ks < K - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            if EPI == 1:  # the up projection: columns f + cols of w13
                b2 = tl.load(b_ptrs + N * stride_bn, mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc2 = tl.dot(a, b2, acc2)
            a_ptrs += BK
            b_ptrs += BK * stride_bk
        r64 = rows.to(tl.int64)[:, None]
        m2 = rmask[:, None] & cmask[None, :]
        c_ptrs = c_ptr + r64 * stride_cm + cols[None, :]
        if EPI == 0:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m2)
        elif EPI == 1:
            g = acc.to(c_ptr.dtype.element_ty)
            u = acc2.to(c_ptr.dtype.element_ty)
            tl.store(c_ptrs, g, mask=m2)
            tl.store(c_ptrs + N, u, mask=m2)
            gf = g.to(tl.float32)  # from the rounded values, as the unfused swiglu sees them
            out = gf * tl.sigmoid(gf) * u.to(tl.float32)
            tl.store(act_ptr + r64 * N + cols[None, :], out.to(act_ptr.dtype.element_ty), mask=m2)
        elif EPI == 2:
            da = acc.to(c_ptr.dtype.element_ty).to(tl.float32)  # dact, rounded as the unfused path stores it
            swiglu_bwd_store(da, h_ptr + r64 * stride_hm + cols[None, :], c_ptrs, m2, N)
        else:
            slots = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
            gw = tl.load(gw_ptr + slots, mask=rmask, other=0.0).to(tl.float32)
            if EPI == 3:
                if ATOMIC:  # fp32 adds in arrival order: not deterministic on a GPU
                    tl.atomic_add(c_ptr + (slots // topk)[:, None] * stride_cm + cols[None, :], acc * gw[:, None],
                                  mask=m2, sem="relaxed")
                else:
                    tl.store(c_ptr + slots[:, None] * stride_cm + cols[None, :],
                             (acc * gw[:, None]).to(c_ptr.dtype.element_ty), mask=m2)
            else:
                # tile-local int32 offsets from a 64-bit row base: fewer live 64-bit pointers (no spills)
                local = tl.arange(0, BM)[:, None]
                av = tl.load(act_ptr + row0.to(tl.int64) * N + (local * N + cols[None, :]), mask=m2, other=0.0)
                tl.store(pw_ptr + slots * stride_pw + pid_n, tl.sum(av.to(tl.float32) * acc, axis=1), mask=rmask)
                da = (acc * gw[:, None]).to(c_ptr.dtype.element_ty).to(tl.float32)  # dact, rounded as unfused
                swiglu_bwd_store(da, h_ptr + row0.to(tl.int64) * stride_hm + (local * stride_hm + cols[None, :]),
                                 c_ptr + row0.to(tl.int64) * stride_cm + (local * stride_cm + cols[None, :]), m2, N)

    @triton.jit
    def wgrad(a_ptr, src_ptr, g_ptr, dw_ptr, offs_ptr, KD, N, stride_am, stride_gm,
              GATHER: tl.constexpr, BKO: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        """dw[e] = A[rows of e]^T @ G[rows of e] over a (BKO, BN) tile; A rows gathered through src.
        Experts without rows get zeros."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        n_tiles = tl.cdiv(N, BN)
        kk = (pid // n_tiles) * BKO + tl.arange(0, BKO)
        nn = (pid % n_tiles) * BN + tl.arange(0, BN)
        kmask = kk < KD
        nmask = nn < N
        end = tl.load(offs_ptr + e)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        acc = tl.zeros((BKO, BN), dtype=tl.float32)
        for r0 in range(start, end, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < end
            arows = source_rows(src_ptr, rows, rmask, GATHER)
            a = tl.load(a_ptr + arows[None, :] * stride_am + kk[:, None], mask=kmask[:, None] & rmask[None, :],
                        other=0.0)
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + nn[None, :],
                        mask=rmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, g, acc)
        out = dw_ptr + e.to(tl.int64) * KD * N + kk.to(tl.int64)[:, None] * N + nn[None, :]
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


@functools.cache
def _kernels() -> dict[str, Any] | None:
    """The raw kernels and their autotuned wrappers, or None without Triton."""
    if triton is None:
        return None

    def configs(table: list[tuple[int, ...]], names: tuple[str, str, str]) -> list[Any]:
        return [triton.Config(dict(zip(names, c[:3], strict=True)), num_warps=c[3], num_stages=c[4]) for c in table]

    key = ["N", "K", "EPI", "GATHER", "ATOMIC"]
    tuned = {
        "gmm": triton.autotune(configs(GMM_CONFIGS, ("BM", "BN", "BK")), key=key)(gmm),
        "swiglu": triton.autotune(configs(SWIGLU_CONFIGS, ("BM", "BN", "BK")), key=key)(gmm),
        "combine": triton.autotune(configs(COMBINE_CONFIGS, ("BM", "BN", "BK")), key=key)(gmm),
        # the autotuner runs every config on the same buffers: zero what they accumulate into (atomic
        # combine output; the per-column partial gate gradients, whose column count depends on BN)
        "combine_atomic": triton.autotune(configs(COMBINE_CONFIGS, ("BM", "BN", "BK")), key=key,
                                          reset_to_zero=["c_ptr"])(gmm),
        "dact": triton.autotune(configs(DACT_CONFIGS, ("BM", "BN", "BK")), key=key, reset_to_zero=["pw_ptr"])(gmm),
        "wgrad": triton.autotune(configs(WGRAD_CONFIGS, ("BKO", "BN", "BR")), key=["KD", "N", "GATHER"])(wgrad),
    }
    return {"gmm": gmm, "wgrad": wgrad, "tuned": tuned}


def problem(x: torch.Tensor) -> str | None:
    """Why the fused kernels cannot run on x (None when they can)."""
    if _kernels() is None:
        return "Triton is not installed"
    if not x.is_cuda and not interpreting():
        return f"the fused MoE kernels run on CUDA tensors (or under TRITON_INTERPRET=1), got {x.device}"
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 8:
        return "the fused MoE kernels need a GPU of compute capability >= 8.0"
    return None


def _run_gmm(name: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, out: torch.Tensor, rows: int, N: int,
             *, b_transposed: bool = False, src: torch.Tensor | None = None, act: torch.Tensor | None = None,
             h: torch.Tensor | None = None, slot: torch.Tensor | None = None, gate: torch.Tensor | None = None,
             pw: torch.Tensor | None = None, topk: int = 1, epi: int = 0, atomic: bool = False) -> None:
    """Launch gmm over `rows` permuted rows: autotuned wrapper `name` on CUDA, the interpreter's
    config under TRITON_INTERPRET=1. Pointer arguments an epilogue does not use get `offs` as a
    placeholder (never read: the constexpr EPI removes those loads)."""
    kern = _kernels()
    assert kern is not None
    if rows == 0:
        return
    E, K = b.shape[0], a.shape[1]
    sbe, sbk, sbn = (b.stride(0), b.stride(2), b.stride(1)) if b_transposed else b.stride()
    act = out if act is None else act
    h = out if h is None else h
    args = (a, offs if src is None else src, b, out, act, h, offs, offs if slot is None else slot,
            offs if gate is None else gate, offs if pw is None else pw, E, N, K, topk,
            a.stride(0), sbe, sbk, sbn, out.stride(0), h.stride(0), 0 if pw is None else pw.stride(0))
    meta = {"EP": pow2_at_least(E), "GATHER": src is not None, "EPI": epi, "ATOMIC": atomic}
    if interpreting():
        bm, bn, bk, _, _ = INTERPRET_CONFIG["gmm"]
        kern["gmm"][(triton.cdiv(N, bn), triton.cdiv(rows, bm) + E)](*args, **meta, BM=bm, BN=bn, BK=bk)
    else:
        kern["tuned"][name][lambda m: (triton.cdiv(N, m["BN"]), triton.cdiv(rows, m["BM"]) + E)](*args, **meta)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, src: torch.Tensor | None = None,
                 rows: int | None = None, epi: int = 0, h: torch.Tensor | None = None,
                 b_transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton grouped GEMM over `rows` permuted rows (default a.shape[0]).

    a: (rows_a, K) row-major; src: (rows,) source row of a for each permuted row (gather) or None;
    b: (E, K, N) or, with b_transposed, (E, N, K) read as its per-expert transpose.
    epi 0 -> (out (rows, N), None); epi 1 (b (E, K, 2f)) -> (h13 (rows, 2f), act (rows, f));
    epi 2 (h = h13) -> (dh13 (rows, 2f), None).
    """
    rows = a.shape[0] if rows is None else rows
    N = b.shape[1] if b_transposed else b.shape[2] // (2 if epi == 1 else 1)
    out = a.new_empty(rows, 2 * N if epi in (1, 2) else N)
    act = a.new_empty(rows, N) if epi == 1 else None
    _run_gmm("swiglu" if epi == 1 else "gmm", a, b, offs, out, rows, N, b_transposed=b_transposed, src=src, act=act,
             h=h, epi=epi)
    return out, act


def combine_gemm(act: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor,
                 topk: int, atomic: bool = False) -> torch.Tensor:
    """y (T, d) = sum_j gate[t*k+j] * (act @ w2[e]) [row of slot (t, j)], in act's dtype.

    act (T*k, f) expert-sorted; slot (T*k,) flat (token, slot) index of each row (Dispatch.order);
    gate (T*k,) the gate weights in flat slot order. The down projection's epilogue scales each row
    by its gate weight and writes it at its slot of a token-major (T*k, d) buffer whose k rows per
    token are then summed (torch's sum: fp32 accumulation, one contiguous pass, deterministic); with
    `atomic` it adds the rows into a zeroed (T, d) fp32 output instead (no T*k*d buffer, but the
    summation order depends on scheduling: not bitwise reproducible on a GPU).
    """
    rows, N = act.shape[0], w2.shape[2]
    T = rows // topk
    out = (torch.zeros(T, N, device=act.device, dtype=torch.float32) if atomic else act.new_empty(rows, N))
    _run_gmm("combine_atomic" if atomic else "combine", act, w2, offs, out, rows, N, slot=slot, gate=gate, topk=topk,
             epi=3, atomic=atomic)
    # dtype given: autocast runs sum in fp32 otherwise (CUDA sums of bf16 accumulate in fp32 either way)
    return out.to(act.dtype) if atomic else out.view(T, topk, N).sum(dim=1, dtype=act.dtype)


def combine_dact(dout: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, src: torch.Tensor, slot: torch.Tensor,
                 gate: torch.Tensor, act: torch.Tensor, h13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of combine_gemm through the SwiGLU: (dh13 (T*k, 2f), dgate (T*k,) fp32 in flat slot order).

    Row p (token t = src[p], slot s = slot[p]) of dout @ w2[e]^T is both the unscaled gradient of
    act (so dact = gate[s] * it; no weighted dy_perm is read) and, dotted with act, the gate-weight
    gradient <dout[t], act[p] @ w2[e]>. Each (BM, BN) tile writes its partial dot products to
    column pid_n of a zeroed (T*k, columns) fp32 buffer, summed here: no atomics, deterministic.
    """
    rows, N = src.shape[0], w2.shape[1]
    pw = torch.zeros(rows, triton.cdiv(N, MIN_BN), device=dout.device, dtype=torch.float32)
    out = dout.new_empty(rows, 2 * N)
    _run_gmm("dact", dout, w2, offs, out, rows, N, b_transposed=True, src=src, act=act, h=h13, slot=slot, gate=gate,
             pw=pw, epi=4)
    return out, pw.sum(dim=1)


def weight_grad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
    """dw (E, K, N): dw[e] = a[src[rows of e]]^T @ g[rows of e] (a not gathered when src is None)."""
    kern = _kernels()
    assert kern is not None
    E, K, N = offs.shape[0], a.shape[1], g.shape[1]
    dw = a.new_empty(E, K, N)
    srcp = src if src is not None else offs
    args = (a, srcp, g, dw, offs, K, N, a.stride(0), g.stride(0))
    if interpreting():
        bko, bn, br, _, _ = INTERPRET_CONFIG["wgrad"]
        kern["wgrad"][(triton.cdiv(K, bko) * triton.cdiv(N, bn), E)](*args, GATHER=src is not None, BKO=bko, BN=bn,
                                                                     BR=br)
    else:
        kern["tuned"]["wgrad"][lambda m: (triton.cdiv(K, m["BKO"]) * triton.cdiv(N, m["BN"]), E)](
            *args, GATHER=src is not None)
    return dw


# --------------------------------------------------------------------------------- the autograd op
def _plain(kind: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    """One grouped product without autograd (kinds as kernels.grouped_gemm.product): on "cutlass" or
    "torch_grouped" that function, on "triton" the kernels here (what the interpreter tests use)."""
    if backend != "triton":
        return product(kind, a, b, offs, backend)
    if kind == "fwd":
        return grouped_gemm(a, b, offs)[0]
    if kind == "dx":
        return grouped_gemm(a, b, offs, b_transposed=True)[0]
    return weight_grad(a, b, offs)


class _TritonGroupedMM(torch.autograd.Function):
    """The plain product on the Triton kernels (for the benchmark's op-level comparison)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, offs)
        return _plain("fwd", x, w, offs, "triton")

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        return _plain("dx", dy, w, offs, "triton"), _plain("dw", x, dy, offs, "triton"), None


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (rows, k) @ w[e] (k, n) per expert row range, differentiable, on the Triton kernels."""
    return _TritonGroupedMM.apply(x, w, offs)


def _input_grads(ctx: Any, x: torch.Tensor, w13: torch.Tensor, src: torch.Tensor, inverse: torch.Tensor,
                 offs: torch.Tensor, dh13: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw13) of the fused blocks from dh13 (each None when x / w13 need no gradient)."""
    dx = dw13 = None
    if ctx.needs_input_grad[0]:
        dx = sum_slots(_plain("dx", dh13, w13, offs, ctx.plain), inverse, ctx.k)
    if ctx.needs_input_grad[1]:
        if OPTIONS["wgrad"] == "gather":
            dw13 = weight_grad(x, dh13, offs, src)
        else:  # gather x once more (one bandwidth pass), then the plain weight-gradient GEMM
            dw13 = _plain("dw", x.index_select(0, src), dh13, offs, ctx.plain)
    return dx, dw13


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, src: torch.Tensor,
                inverse: torch.Tensor, offs: torch.Tensor, k: int, plain: str) -> torch.Tensor:
        x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
        h13, act = grouped_gemm(x, w13, offs, src=src, rows=src.shape[0], epi=1)
        y = _plain("fwd", act, w2, offs, plain)
        ctx.save_for_backward(x, w13, w2, src, inverse, offs, h13, act)
        ctx.k, ctx.plain = k, plain
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w13, w2, src, inverse, offs, h13, act = ctx.saved_tensors
        dy = dy.contiguous()
        dh13, _ = grouped_gemm(dy, w2, offs, epi=2, h=h13, b_transposed=True)
        dw2 = _plain("dw", act, dy, offs, ctx.plain) if ctx.needs_input_grad[2] else None
        dx, dw13 = _input_grads(ctx, x, w13, src, inverse, offs, dh13)
        return dx, dw13, dw2, None, None, None, None, None


@torch.compiler.disable  # Triton launches behind Python dispatch: run eagerly inside compiled blocks
def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, src: torch.Tensor, inverse: torch.Tensor,
                  offs: torch.Tensor, k: int, plain: str = "torch_grouped") -> torch.Tensor:
    """SwiGLU experts over the routed rows, gathering from token-major x.

    x (T, d); w13 (E, d, 2f) = [gate | up]; w2 (E, f, d); src (T*k,) token of each expert-sorted
    row; inverse (T*k,) sorted row of each (token, slot); offs (E,) int32 row ends. Returns the
    expert outputs (T*k, d) in expert-sorted order (combine them with kernels.permute.unpermute).
    """
    return _FusedExperts.apply(x, w13, w2, src, inverse, offs, k, plain)


class _FusedCombined(torch.autograd.Function):
    """The expert block with the combine in the down projection's epilogue: token-major y (T, d)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                src: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, offs: torch.Tensor, k: int, plain: str,
                atomic: bool) -> torch.Tensor:
        x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
        gate = weights.reshape(-1).contiguous()
        h13, act = grouped_gemm(x, w13, offs, src=src, rows=src.shape[0], epi=1)
        y = combine_gemm(act, w2, offs, order, gate, k, atomic)
        ctx.save_for_backward(x, w13, w2, weights, src, order, inverse, offs, h13, act)
        ctx.k, ctx.plain = k, plain
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w13, w2, weights, src, order, inverse, offs, h13, act = ctx.saved_tensors
        dy = dy.contiguous()
        try:
            dh13, dgate = combine_dact(dy, w2, offs, src, order, weights.reshape(-1).contiguous(), act, h13)
        except Exception as err:  # e.g. a Triton version that cannot compile this epilogue: the unfused maths
            if not _may_fall_back(err):
                raise
            combine_switch.trip("the dact/gate-gradient GEMM", err)
            dh13, dgate = _combine_dact_unfused(dy, w2, offs, src, order, weights, inverse, act, h13, ctx.plain)
        dweights = dgate.view(weights.shape).to(weights.dtype) if ctx.needs_input_grad[3] else None
        dw2 = None
        if ctx.needs_input_grad[2]:  # dy_perm[p] = gate * dy[token of p]: one weighted scatter pass
            dw2 = _plain("dw", act, scatter_weighted(dy, weights, order, inverse), offs, ctx.plain)
        dx, dw13 = _input_grads(ctx, x, w13, src, inverse, offs, dh13)
        return dx, dw13, dw2, dweights, None, None, None, None, None, None, None


@torch.compiler.disable  # Triton launches behind Python dispatch: run eagerly inside compiled blocks
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, src: torch.Tensor,
              order: torch.Tensor, inverse: torch.Tensor, offs: torch.Tensor, k: int,
              plain: str = "torch_grouped") -> torch.Tensor:
    """The routed SwiGLU experts and their gate-weighted combine: token-major y (T, d), x's dtype.

    As fused_experts, plus weights (T, k) (the router's gate weights, differentiable) and order
    (T*k,) flat (token, slot) index of each expert-sorted row. OPTIONS["combine"] picks where the
    weighted sum happens ("slots", "atomic" or "unfused"; see OPTIONS)."""
    mode = OPTIONS["combine"]
    if mode not in COMBINE_MODES:
        raise ValueError(f"moe_fused.OPTIONS['combine']={mode!r} is not one of {COMBINE_MODES}")
    if mode != "unfused" and not combine_switch:
        try:
            return _FusedCombined.apply(x, w13, w2, weights, src, order, inverse, offs, k, plain, mode == "atomic")
        except Exception as err:  # a launch/compile failure: this call and the next ones run unfused
            if not _may_fall_back(err):
                raise
            combine_switch.trip("the combine GEMM", err)
    return unpermute(_FusedExperts.apply(x, w13, w2, src, inverse, offs, k, plain), weights, order, inverse)


combine_switch = KillSwitch(log, "kernels.moe_fused: the fused combine", "combine='unfused'")


def _may_fall_back(err: Exception) -> bool:
    """Whether a failed combine kernel may be replaced by the unfused maths: not when out of memory (the
    fallback needs more) nor while a CUDA graph is being captured (the error is the capture's, and a
    switch would silently change what later calls run)."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not isinstance(err, torch.cuda.OutOfMemoryError) and not capturing


def _combine_dact_unfused(dy: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, src: torch.Tensor,
                          order: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor, act: torch.Tensor,
                          h13: torch.Tensor, plain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """combine_dact's results the unfused way (its fallback): dh13 from the weighted dy_perm through
    the SwiGLU-backward GEMM, the gate gradient <dy[t], y_perm[p]> from a recomputed y_perm."""
    dy_perm = scatter_weighted(dy, weights, order, inverse)
    dh13, _ = grouped_gemm(dy_perm, w2, offs, epi=2, h=h13, b_transposed=True)
    y_perm = _plain("fwd", act, w2, offs, plain)
    dgate = torch.empty(order.shape[0], device=dy.device, dtype=torch.float32)
    dgate[order] = (y_perm.float() * dy.index_select(0, src).float()).sum(-1)
    return dh13, dgate
