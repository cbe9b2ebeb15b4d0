"""Training MFU on one GPU: a ~100M-parameter dense LM and MoEs of equal total params at ~20% activation.

The models come from the study's planner (moe_study.accounting.plan_run) on a built-in budget
(N = 1e8 non-vocab params, d_model 512, 8 layers, 8 heads, seq_len 1024, vocab --vocab), so the
MoE has the dense model's N at activation rate ~0.2. Each variant (engine torch|deepspeed, with or
without torch.compile of the blocks) trains with the real loop, `moe_study.train.loop.train`, on random
tokens for --warmup + --steps steps; the rate is the median step time of the timed steps (each step
ends with a host sync of its loss, as in a real run).

MFU is reported two ways:
- `mfu`: the planner's FLOPs, 6 * N_active per token (what train.json and steps.parquet report),
  over the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s);
- `mfu_full`: also counting the tied LM head (6 * d * V) and causal attention scores
  (6 * L * S * d: half of the 12 L S d of a full attention matrix) per token.

`--compile-mode` (train.compile_mode, e.g. max-autotune-no-cudagraphs) applies to the compiled
variants (":1"; they compile each block and the loss head: final norm + LM head + cross-entropy);
`--expert-backend` (train.expert_backend) picks the MoE kernels. Both are recorded in every row.
On a machine without CUDA it runs too (slowly; MFU null), e.g. as a smoke test:
`python bench/train_mfu.py --runs d512/dense --variants torch:0 --steps 2 --warmup 1 --batch 2`.

    python bench/train_mfu.py --out results/perf/train_mfu_h100.json [--profile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import RandomLoader  # noqa: E402

from kernels import profiling  # noqa: E402
from kernels import router as fused_router  # noqa: E402
from moe_study.accounting import plan_run, train_flops  # noqa: E402
from moe_study.config.schema import parse_params  # noqa: E402
from moe_study.model.lm import build_model  # noqa: E402
from moe_study.train.loop import train  # noqa: E402
from moe_study.train.trainlog import device_peak_flops, mfu  # noqa: E402

BENCH_PARAMS: dict[str, Any] = {
    "study": "bench",
    "corpus": {"sources": [{"kind": "synthetic"}]},
    # params_tol 5%: at multiple_of 64 the closest MoE shapes are 2.8% / 3.5% off N (what was measured)
    "budget": {"params": 1e8, "compute": 1e18, "unique_tokens": 10**10, "params_tol": 0.05, "compute_convention": "6n"},
    "model": {"d_model": 512, "n_layers": 8, "n_heads": 8, "seq_len": 1024, "multiple_of": 64},
    "runs": {
        "dense": {"kind": "dense"},
        "moe_k1": {"kind": "moe", "activation_rate": 0.2, "top_k": 1},
        "moe_k2": {"kind": "moe", "activation_rate": 0.2, "top_k": 2},
    },
    "train": {"batch_size": 32, "lr": 1e-3, "warmup_steps": 5, "dtype": "bf16", "expert_backend": "torch_grouped",
              "log_every": 10**6, "checkpoint_every": 0},
}


PROFILED_STEPS = 3  # steps recorded by --profile (after warm-up)

class ProfiledLoader(RandomLoader):
    """Random batches that advance the profiler's schedule once per step."""

    def __init__(self, batch: int, seq_len: int, vocab: int, prof: Any) -> None:
        super().__init__(batch, seq_len, vocab)
        self.prof = prof

    def __next__(self) -> torch.Tensor:
        self.prof.step()
        return super().__next__()


def full_flops_per_token(arch: Any, vocab: int) -> float:
    attention = 6 * arch.n_layers * arch.seq_len * arch.d_model
    return train_flops(arch.nonvocab_active, 1) + 6 * arch.d_model * vocab + attention


# Model families: the study's (d512: an MoE at r_a 0.2 fits) and a wider dense one of the same N
# (d768, d1024: attention alone is 28% / 25% of N there, so no MoE at 0.2 exists in them).
FAMILIES = {
    "d512": {"d_model": 512, "n_layers": 8, "n_heads": 8},
    "d768": {"d_model": 768, "n_layers": 12, "n_heads": 12},
    "d1024": {"d_model": 1024, "n_layers": 6, "n_heads": 16},
}


def measure(spec: str, engine: str, compile_: bool, vocab: int, steps: int, warmup: int, batch: int,
            profile_dir: Path | None = None, compile_mode: str | None = None,
            expert_backend: str = "torch_grouped") -> dict[str, Any]:
    family, _, run = spec.rpartition("/")
    raw = json.loads(json.dumps(BENCH_PARAMS))
    raw["model"] |= FAMILIES[family or "d512"]
    engine, _, zero = engine.partition("@")  # "deepspeed@2": ZeRO stage 2
    raw["train"] |= {"batch_size": batch, "engine": engine, "compile": compile_, "zero_stage": int(zero or 1),
                     "compile_mode": compile_mode if compile_ else None, "expert_backend": expert_backend,
                     "cuda_graph": False}  # what its rows measured (auto would graph the torch engine's steps)
    p = parse_params(raw)
    plan = plan_run(p, run)
    torch.manual_seed(0)
    model = build_model(plan.arch.to_dict(), vocab, p.train.expert_backend)
    loader = RandomLoader(plan.batch_size, plan.arch.seq_len, vocab)
    t0 = time.perf_counter()
    prof = None
    if profile_dir is not None:
        from torch.profiler import ProfilerActivity, profile, schedule

        prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available(),
                       schedule=schedule(wait=max(0, warmup - 2), warmup=1, active=PROFILED_STEPS, repeat=1))
        prof.__enter__()
        loader = ProfiledLoader(plan.batch_size, plan.arch.seq_len, vocab, prof)
    fpt, full = train_flops(plan.arch.nonvocab_active, 1), full_flops_per_token(plan.arch, vocab)
    trainer, metrics = train(model, loader, p.train, steps=steps + warmup, batch_size=plan.batch_size,
                             lr=p.train.lr, seed=0, flops_per_token=fpt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
    step_s = statistics.median(h.seconds for h in trainer.history[warmup:])
    tok_s = plan.tokens_per_step / step_s
    run_mfu, run_mfu_full = mfu(fpt, tok_s, trainer.peak_flops), mfu(full, tok_s, trainer.peak_flops)
    row = {
        "run": spec, "family": family or "d512", "d_model": plan.arch.d_model, "n_layers": plan.arch.n_layers,
        "kind": plan.arch.kind, "experts": plan.arch.experts, "top_k": plan.arch.top_k,
        "ffn_hidden": plan.arch.ffn_hidden, "nonvocab_params": plan.arch.nonvocab_total,
        "nonvocab_active": plan.arch.nonvocab_active, "activation_rate": round(plan.arch.activation_rate, 4),
        "engine": metrics["engine"], "zero_stage": int(zero or 1) if engine == "deepspeed" else None,
        "compile": compile_, "compile_mode": p.train.compile_mode, "expert_backend": p.train.expert_backend,
        "dtype": "bf16", "batch": plan.batch_size,
        "seq_len": plan.arch.seq_len, "vocab": vocab, "expert_backends": metrics["expert_backends"],
        "ms_per_step": round(step_s * 1e3, 2), "tokens_per_s": round(tok_s), "flops_per_token": fpt,
        "flops_per_token_full": full, "mfu": None if run_mfu is None else round(run_mfu, 4),
        "mfu_full": None if run_mfu_full is None else round(run_mfu_full, 4),
        "loss_first": round(trainer.history[0].loss, 4), "loss_last": round(trainer.history[-1].loss, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "wall_s": round(wall, 1),
    }
    if prof is not None and profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        name = f"profile_{spec.replace('/', '_')}_{engine}_{'compiled' if compile_ else 'eager'}.txt"
        (profile_dir / name).write_text(table)
        spans = profiling.kernel_spans(prof)
        row["profile_gpu_share"] = profiling.shares(spans)
        # GPU-busy time / wall time over the profiled steps (profiled by the schedule above)
        row["profile_gpu_busy"] = round(profiling.busy_us(spans) / 1e3 / (PROFILED_STEPS * step_s * 1e3), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="dense,moe_k1,moe_k2", help="[family/]run, comma-separated")
    ap.add_argument("--variants", default="torch:0,torch:1,deepspeed:0,deepspeed:1",
                    help="engine[@zero_stage]:compile, comma-separated")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--compile-mode", default=None,
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the compiled variants (train.compile_mode; default: torch's)")
    ap.add_argument("--expert-backend", default="torch_grouped", choices=["torch_grouped", "cutlass", "fused", "auto"],
                    help="MoE expert kernels (train.expert_backend); each row names the backend that ran")
    ap.add_argument("--router", default=None, choices=["eager", "fused"],
                    help="MoE router: eager PyTorch or kernels/router.py (default: the model's); rows say which")
    ap.add_argument("--profile", default=None,
                    help="run:engine:compile[;run:engine:compile] to profile once (3 steps) after the table")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.router is not None:
        fused_router.OPTIONS["router"] = "eager" if a.router == "eager" else "auto"
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if not a.out:
            return
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cuda = torch.cuda.is_available()
        info = {"python": platform.python_version(), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if cuda else None,
                "peak": device_peak_flops(torch.device("cuda" if cuda else "cpu"))[1]}
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        out.write_text(json.dumps({"command": cmd, "machine": info, "rows": rows}, indent=2) + "\n")

    for run in a.runs.split(","):
        for v in a.variants.split(","):
            engine, comp = v.split(":")
            try:
                r = measure(run, engine, comp == "1", a.vocab, a.steps, a.warmup, a.batch,
                            compile_mode=a.compile_mode, expert_backend=a.expert_backend)
            except Exception as err:  # report and go on
                r = {"run": run, "engine": engine, "compile": comp == "1", "compile_mode": a.compile_mode,
                     "expert_backend": a.expert_backend, "skipped": f"{type(err).__name__}: {err}"[:400]}
            r["router"] = fused_router.OPTIONS["router"]
            rows.append(r)
            print(json.dumps(r), flush=True)
            save()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    for prof in (a.profile.split(";") if a.profile and a.out else []):
        run, engine, comp = prof.split(":")
        r = measure(run, engine, comp == "1", a.vocab, 3, a.warmup, a.batch, profile_dir=Path(a.out).parent,
                    compile_mode=a.compile_mode, expert_backend=a.expert_backend)
        r["profiled"] = True
        rows.append(r)
        print(json.dumps(r), flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
