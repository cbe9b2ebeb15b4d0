"""Fused MoE router: scores, top-k, gate weights (renormalised or not), counts, balancing and z losses in
two small Triton kernels forward and one backward.

The eager router (moe_study/model/router.py `Router`) is ~15 launches forward (softmax, mean, topk, sum, div,
a scatter_add for the counts, logsumexp, pow, mean, ...) and a long autograd chain of small kernels
backward; at T=16384 tokens, top-8 of 64 it was ~0.45 ms of a ~3.5 ms MoE layer step on an H100
(results/kernels/profile_moe_layer_fused_shape0_h100.txt). Here, from the router logits x (T, E):

  forward   router_fwd       tiles of BT tokens, the whole row of E <= 256 scores in registers:
                             p = softmax(x) (or sigmoid(x)), top-k by k rounds of argmax (ties -> lowest
                             index; an optional selection bias added for choosing only), the weights
                             w (the chosen scores, renormalised to sum 1 when NORMALIZE), lse =
                             logsumexp(x); each of <= MAX_PROGRAMS programs writes its
                             partial sums of the importance scores, counts and lse^2 to (programs, E)
            router_finalize  one program sums those partials in a fixed order (deterministic: no float
                             atomics) into counts, load = counts / sum(counts), importance P = mean of
                             the scores, aux = E * sum(load * P) and z = mean(lse^2)
  backward  router_bwd       dL/dx in one pass (maths in `backward_reference`)

The formulas are those of `Router.forward` (the reference; CPU always runs it). Launch errors fall
back to the eager router (forward) or the eager backward maths (backward), logged once.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from kernels.permute import pow2_at_least
from kernels.triton_env import KillSwitch, interpreting

log = logging.getLogger("kernels.router")

# "auto": the fused router where it can run (CUDA tensors, Triton, E <= MAX_EXPERTS); "eager": never
OPTIONS = {"router": "auto"}
MAX_EXPERTS = 256
_switch = KillSwitch(log, "kernels.router: the Triton router", "the eager router")


@functools.cache
def _kernels() -> dict[str, Any] | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def router_fwd(x_ptr, bias_ptr, w_ptr, idx_ptr, lse_ptr, s_ptr, imp_part_ptr, cnt_part_ptr, z_part_ptr,
                   T, E, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                   SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BE)
        kcols = tl.arange(0, BK)
        cmask = cols < E
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        imp_acc = tl.zeros([BE], dtype=tl.float32)
        cnt_acc = tl.zeros([BE], dtype=tl.int32)
        z_acc = tl.zeros([BT], dtype=tl.float32)
        for t0 in range(pid * BT, T, nprog * BT):  # tiles pid, pid + nprog, ...: partial sums per program
            rows = t0 + tl.arange(0, BT)
            rmask = rows < T
            m2 = rmask[:, None] & cmask[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(x_ptr + rows64[:, None] * E + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
            mx = tl.where(rmask, tl.max(x, 1), 0.0)  # rows past T: all -inf, kept finite
            ex = tl.exp(x - mx[:, None])
            se = tl.where(rmask, tl.sum(ex, 1), 1.0)
            lse = mx + tl.log(se)
            if SIGMOID:
                p = tl.where(m2, tl.sigmoid(x), 0.0)
                ps = tl.where(rmask, tl.sum(p, 1), 1.0)
                imp_acc += tl.sum(p / ps[:, None], 0)  # DeepSeek-V3's normalised affinity
            else:
                p = ex / se[:, None]
                imp_acc += tl.sum(p, 0)  # rows past T and columns past E have p = 0
            sel = p
            if HAS_BIAS:
                sel = p + bias[None, :]
            sel = tl.where(cmask[None, :], sel, float("-inf"))
            wt = tl.zeros([BT, BK], dtype=tl.float32)
            it = tl.zeros([BT, BK], dtype=tl.int32)
            for j in tl.static_range(K):  # k rounds of argmax, ties -> the lowest expert id
                best = tl.max(sel, 1)
                pick = tl.min(tl.where(sel == best[:, None], cols[None, :], BE), 1)
                pick = tl.minimum(pick, E - 1)  # only a NaN row matches nothing: keep the index in range
                hit = cols[None, :] == pick[:, None]
                wj = tl.sum(tl.where(hit, p, 0.0), 1)
                wt = tl.where(kcols[None, :] == j, wj[:, None], wt)
                it = tl.where(kcols[None, :] == j, pick[:, None], it)
                sel = tl.where(hit, float("-inf"), sel)
            s = tl.where(rmask, tl.sum(wt, 1), 1.0)
            km = rmask[:, None] & (kcols[None, :] < K)
            out = rows64[:, None] * K + kcols[None, :]
            if NORMALIZE:
                wt = wt / s[:, None]
            tl.store(w_ptr + out, wt, mask=km)
            tl.store(idx_ptr + out, it.to(tl.int64), mask=km)
            tl.store(lse_ptr + rows, lse, mask=rmask)
            tl.store(s_ptr + rows, s, mask=rmask)
            # chosen = the -inf'd columns of sel (E - chosen are still finite: p and the bias are finite)
            chosen = (sel == float("-inf")) & m2
            cnt_acc += tl.sum(chosen.to(tl.int32), 0)
            z_acc += tl.where(rmask, lse * lse, 0.0)
        tl.store(imp_part_ptr + pid * E + cols, imp_acc, mask=cmask)
        tl.store(cnt_part_ptr + pid * E + cols, cnt_acc, mask=cmask)
        tl.store(z_part_ptr + pid, tl.sum(z_acc, 0))

    @triton.jit
    def router_finalize(imp_part_ptr, cnt_part_ptr, z_part_ptr, counts_ptr, load_ptr, aux_ptr, z_ptr,
                        nblocks, T, E, BB: tl.constexpr, BE: tl.constexpr):
        cols = tl.arange(0, BE)
        cmask = cols < E
        acc = tl.zeros([BB, BE], dtype=tl.float32)
        cacc = tl.zeros([BB, BE], dtype=tl.int32)
        zacc = tl.zeros([BB], dtype=tl.float32)
        for b0 in range(0, nblocks, BB):  # a fixed summation order: the same bits every run
            r = b0 + tl.arange(0, BB)
            rm = r < nblocks
            m = rm[:, None] & cmask[None, :]
            acc += tl.load(imp_part_ptr + r[:, None] * E + cols[None, :], mask=m, other=0.0)
            cacc += tl.load(cnt_part_ptr + r[:, None] * E + cols[None, :], mask=m, other=0)
            zacc += tl.load(z_part_ptr + r, mask=rm, other=0.0)
        importance = tl.sum(acc, 0) / T
        cnt = tl.sum(cacc, 0)
        # correctly rounded, as torch divides: the same load bits as the eager router (`/` is approximate)
        load = tl.div_rn(cnt.to(tl.float32), tl.zeros([BE], dtype=tl.float32) + tl.sum(cnt, 0).to(tl.float32))
        tl.store(counts_ptr + cols, cnt.to(tl.int64), mask=cmask)
        tl.store(load_ptr + cols, load, mask=cmask)
        tl.store(aux_ptr, E * tl.sum(tl.where(cmask, load * importance, 0.0), 0))
        tl.store(z_ptr, tl.sum(zacc, 0) / T)

    @triton.jit
    def router_bwd(x_ptr, lse_ptr, s_ptr, w_ptr, idx_ptr, gw_ptr, load_ptr, gaux_ptr, gz_ptr, dx_ptr,
                   T, E, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, SIGMOID: tl.constexpr,
                   HAS_GW: tl.constexpr, HAS_GAUX: tl.constexpr, HAS_GZ: tl.constexpr, NORMALIZE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, BE)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        sm = tl.where(m2, tl.exp(x - lse[:, None]), 0.0)  # softmax(x): d lse / dx
        inv_t = 1.0 / T
        dimp = tl.zeros([BE], dtype=tl.float32)  # dL/dP (E,)
        if HAS_GAUX:
            dimp = E * tl.load(load_ptr + cols, mask=cmask, other=0.0) * tl.load(gaux_ptr).to(tl.float32)
        dlse = tl.zeros([BT], dtype=tl.float32)
        if HAS_GZ:
            dlse = 2.0 * lse * tl.load(gz_ptr).to(tl.float32) * inv_t
        if SIGMOID:
            p = tl.where(m2, tl.sigmoid(x), 0.0)
            S = tl.where(rmask, tl.sum(p, 1), 1.0)
            q = p / S[:, None]
            g = (dimp[None, :] - tl.sum(dimp[None, :] * q, 1)[:, None]) * (inv_t / S[:, None])
        else:
            p = sm
            g = tl.zeros([BT, BE], dtype=tl.float32) + dimp[None, :] * inv_t
        if HAS_GW:
            gsel = tl.zeros([BT, BE], dtype=tl.float32)
            chosen = tl.zeros([BT, BE], dtype=tl.int1)
            dws = tl.zeros([BT], dtype=tl.float32)
            for j in tl.static_range(K):
                ij = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=-1).to(tl.int32)
                wj = tl.load(w_ptr + rows64 * K + j, mask=rmask, other=0.0)
                gj = tl.load(gw_ptr + rows64 * K + j, mask=rmask, other=0.0).to(tl.float32)
                hit = cols[None, :] == ij[:, None]
                gsel = tl.where(hit, gj[:, None], gsel)
                chosen = chosen | hit
                dws += gj * wj
            if NORMALIZE:  # w_j = p_{i_j} / s
                s = tl.load(s_ptr + rows, mask=rmask, other=1.0)
                g += tl.where(chosen, (gsel - dws[:, None]) / s[:, None], 0.0)
            else:  # w_j = p_{i_j}
                g += tl.where(chosen, gsel, 0.0)
        if SIGMOID:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
            dx = g * p * (1.0 - p) + dlse[:, None] * sm
        else:
            dx = p * (g + dlse[:, None] - tl.sum(p * g, 1)[:, None])
        tl.store(dx_ptr + rows64[:, None] * E + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m2)

    return {"router_fwd": router_fwd, "router_finalize": router_finalize, "router_bwd": router_bwd}


def blocks(experts: int) -> tuple[int, int]:
    """(BT tokens per tile, BE padded experts): 1024 scores a tile (4 a thread at WARPS=8) keep the k argmax
    rounds and the backward in registers; 2048 spilled in the backward (AOT-compiled for sm_90). At E=64
    a tile is 16 tokens."""
    be = pow2_at_least(experts)
    return max(1, min(64, 1024 // be)), be


WARPS = 8
# router_fwd runs at most this many programs, each over every nprog-th tile, so router_finalize sums
# at most this many partial rows (a fixed number: the summation order depends on T only, not the GPU)
MAX_PROGRAMS = 512


FINALIZE_WARPS = 16  # one program: all its threads load partial rows at once (fewer serial steps)


def finalize_rows(be: int) -> int:
    """Partial rows summed per step of router_finalize: 8192 values of each kind a step (16 a thread), so
    the 512 partial rows at E=64 are 4 steps."""
    return max(1, min(128, 8192 // be))


def problem(logits: torch.Tensor, top_k: int) -> str | None:
    """Why the fused router cannot take these logits (None when it can)."""
    if OPTIONS["router"] == "eager":
        return "kernels.router.OPTIONS['router'] is 'eager'"
    if torch.compiler.is_compiling():  # checked while Dynamo traces Router.forward
        # one graph without a break (also for CUDA graphs); measured even within the noise of a compiled
        # training step (results/perf/train_mfu_router_h100.md)
        return "inside torch.compile: Inductor fuses the eager router maths into the compiled graph"
    if _switch:
        return f"disabled after a launch error ({_switch.reason})"
    if not logits.is_cuda and not interpreting():
        return f"the fused router runs on CUDA tensors (or under TRITON_INTERPRET=1), got {logits.device}"
    if logits.dim() != 2 or logits.shape[0] == 0:
        return "needs (T > 0, E) logits"
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"logits of dtype {logits.dtype}"
    if logits.shape[1] > MAX_EXPERTS or not 1 <= top_k < logits.shape[1]:
        return f"E={logits.shape[1]} > {MAX_EXPERTS} or top_k={top_k} out of range"
    if _kernels() is None:
        return "Triton is not installed"
    return None


def compile_report(experts: int, top_k: int, sigmoid: bool, bias: bool, dtype: str = "bf16",
                   tokens: int = 16384, normalize: bool = True) -> dict[str, dict[str, int]]:
    """AOT-compile each kernel for the H100 (kernels/aot.py: no GPU needed) with the arguments a call
    of this size passes, and report {kernel: {"registers", "spill_stores", "spill_loads", "shared"}}.
    Used by tests/test_router.py; run it after changing a kernel or its block sizes."""
    from kernels.aot import sm90_resources

    kern = _kernels()
    assert kern is not None, "Triton is not installed"
    bt, be = blocks(experts)
    x = torch.empty(16, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    f32, i32, i64 = torch.empty(16), torch.empty(16, dtype=torch.int32), torch.empty(16, dtype=torch.int64)
    programs = min(-(-tokens // bt), MAX_PROGRAMS)
    sizes = {"T": tokens, "E": experts}
    plans = {
        "router_fwd": ({"x_ptr": x, "bias_ptr": f32, "w_ptr": f32, "idx_ptr": i64, "lse_ptr": f32, "s_ptr": f32,
                        "imp_part_ptr": f32, "cnt_part_ptr": i32, "z_part_ptr": f32, **sizes, "K": top_k,
                        "BK": pow2_at_least(top_k, 1), "BT": bt, "BE": be, "SIGMOID": sigmoid, "HAS_BIAS": bias,
                        "NORMALIZE": normalize},
                       WARPS),
        "router_finalize": ({"imp_part_ptr": f32, "cnt_part_ptr": i32, "z_part_ptr": f32, "counts_ptr": i64,
                             "load_ptr": f32, "aux_ptr": f32, "z_ptr": f32, "nblocks": programs, **sizes,
                             "BB": finalize_rows(be), "BE": be}, FINALIZE_WARPS),
        "router_bwd": ({"x_ptr": x, "lse_ptr": f32, "s_ptr": f32, "w_ptr": f32, "idx_ptr": i64, "gw_ptr": f32,
                        "load_ptr": f32, "gaux_ptr": f32, "gz_ptr": f32, "dx_ptr": x, **sizes, "K": top_k, "BT": bt,
                        "BE": be, "SIGMOID": sigmoid, "HAS_GW": True, "HAS_GAUX": True, "HAS_GZ": True,
                        "NORMALIZE": normalize}, WARPS),
    }
    return {name: sm90_resources(kern[name], args, num_warps=warps, num_stages=3)
            for name, (args, warps) in plans.items()}


class _LaunchFailed(RuntimeError):
    pass


def _launch(name: str, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch one kernel; on an error remember it (the eager router runs from then on) and raise
    _LaunchFailed for the caller's fallback."""
    try:
        _kernels()[name][grid](*args, **meta)
    except Exception as err:  # e.g. a Triton version that cannot compile these kernels
        raise _LaunchFailed(_switch.trip(name, err)) from err


def backward_reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, load: torch.Tensor,
                       gw: torch.Tensor | None, gaux: torch.Tensor | None, gz: torch.Tensor | None,
                       sigmoid: bool, normalize: bool = True) -> torch.Tensor:
    """dL/dx of the router's outputs, the maths router_bwd runs (and its eager fallback).

    p = softmax(x) (or sigmoid(x)), s = sum of the chosen p, w_j = p_{i_j} / s (normalize; else
    w_j = p_{i_j}, and the first term below is [e = i_j] G_j), P = mean_t p_t (sigmoid:
    of q = p / sum(p)), aux = E * sum(load * P), z = mean_t lse_t^2. With G = dL/dw:
      dL/dp_e = [e = i_j] (G_j - sum_l G_l w_l) / s  +  dL/dP_e / T            (softmax)
              + for sigmoid the importance term is (dL/dP_e - sum_f dL/dP_f q_f) / (T sum(p))
      softmax: dx = p * (g + dlse - sum_e p_e g_e);   sigmoid: dx = g * p (1 - p) + dlse * softmax(x)
    with dlse = 2 lse dL/dz / T.
    """
    x = x if x.dtype == torch.float64 else x.float()
    T, E = x.shape
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    sm = (x - lse).exp()
    dimp = E * load * (gaux if gaux is not None else 0.0)
    dlse = 2.0 * lse * (gz if gz is not None else 0.0) / T
    if sigmoid:
        p = x.sigmoid()
        S = p.sum(-1, keepdim=True)
        g = (dimp - (dimp * (p / S)).sum(-1, keepdim=True)) / (T * S)
    else:
        p = sm
        g = (dimp / T).expand(T, E).clone()
    if gw is not None:
        gw = gw.to(x.dtype)
        if normalize:
            dws = (gw * w).sum(-1, keepdim=True)
            g = g.scatter_add(1, idx, (gw - dws) / s.unsqueeze(-1))
        else:
            g = g.scatter_add(1, idx, gw)
    if sigmoid:
        return g * p * (1 - p) + dlse * sm
    return p * (g + dlse - (p * g).sum(-1, keepdim=True))


class _FusedRouter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, bias: torch.Tensor | None, k: int,
                sigmoid: bool, normalize: bool) -> tuple[torch.Tensor, ...]:
        x = logits.contiguous()
        T, E = x.shape
        bt, be = blocks(E)
        nb = min(-(-T // bt), MAX_PROGRAMS)
        dev = x.device
        w = torch.empty(T, k, device=dev, dtype=torch.float32)
        idx = torch.empty(T, k, device=dev, dtype=torch.int64)
        lse = torch.empty(T, device=dev, dtype=torch.float32)
        s = torch.empty(T, device=dev, dtype=torch.float32)
        imp_part = torch.empty(nb, E, device=dev, dtype=torch.float32)
        cnt_part = torch.empty(nb, E, device=dev, dtype=torch.int32)
        z_part = torch.empty(nb, device=dev, dtype=torch.float32)
        bias_arg = bias.float().contiguous() if bias is not None else lse  # unread without HAS_BIAS
        _launch("router_fwd", (nb,), x, bias_arg, w, idx, lse, s, imp_part, cnt_part, z_part, T, E, K=k,
                BK=pow2_at_least(k, 1), BT=bt, BE=be, SIGMOID=sigmoid, HAS_BIAS=bias is not None,
                NORMALIZE=normalize, num_warps=WARPS)
        counts = torch.empty(E, device=dev, dtype=torch.int64)
        load = torch.empty(E, device=dev, dtype=torch.float32)
        aux = torch.empty((), device=dev, dtype=torch.float32)
        z = torch.empty((), device=dev, dtype=torch.float32)
        _launch("router_finalize", (1,), imp_part, cnt_part, z_part, counts, load, aux, z, nb, T, E,
                BB=finalize_rows(be), BE=be, num_warps=FINALIZE_WARPS)
        ctx.save_for_backward(x, lse, s, w, idx, load)
        ctx.set_materialize_grads(False)
        ctx.sigmoid = sigmoid
        ctx.normalize = normalize
        ctx.mark_non_differentiable(idx, counts, load)
        return w, idx, counts, load, aux, z

    @staticmethod
    def backward(ctx: Any, gw: torch.Tensor | None, _gi: Any, _gc: Any, _gl: Any, gaux: torch.Tensor | None,
                 gz: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None, None]:
        x, lse, s, w, idx, load = ctx.saved_tensors
        T, E = x.shape
        k = w.shape[1]
        dx = torch.empty_like(x)
        bt, be = blocks(E)
        try:  # an unused output's gradient is None (no materialised zeros): its term is compiled out
            _launch("router_bwd", (-(-T // bt),), x, lse, s, w, idx, w if gw is None else gw.contiguous(), load,
                    load if gaux is None else gaux, load if gz is None else gz, dx, T, E, K=k, BT=bt, BE=be,
                    SIGMOID=ctx.sigmoid, HAS_GW=gw is not None, HAS_GAUX=gaux is not None, HAS_GZ=gz is not None,
                    NORMALIZE=ctx.normalize, num_warps=WARPS)
        except _LaunchFailed:
            dx = backward_reference(x, w, idx, s, load, gw, gaux, gz, ctx.sigmoid, ctx.normalize).to(x.dtype)
        return dx, None, None, None, None


@torch.compiler.disable  # Triton launches behind Python dispatch: run eagerly inside compiled blocks
def fused_router(logits: torch.Tensor, top_k: int, score: str = "softmax",
                 bias: torch.Tensor | None = None, normalize: bool = True) -> tuple[torch.Tensor, ...] | None:
    """(weights (T,k) fp32, indices (T,k) int64, counts (E,) int64, load (E,) fp32, aux, z) of the router
    logits (T, E) in float32/bfloat16/float16 (maths in fp32; dlogits in the logits' dtype), or None when
    a launch failed (then the caller runs the eager router). Call only where `problem` is None.

    `bias` (E,) is added to the scores for the top-k selection only (aux-loss-free balancing); the
    weights are the unbiased scores. `normalize` (a plain bool: RouterConfig.normalize_topk): renormalise
    the k weights of a token to sum to 1, or keep the raw scores. aux and z carry gradients, as do the
    weights."""
    try:
        return _FusedRouter.apply(logits, bias, top_k, score == "sigmoid", bool(normalize))
    except _LaunchFailed:
        return None
