"""Training-step speed at the study's own shapes (issue 15): the 20M family, dense and MoE r_a 0.1/0.2/0.42.

Family: d_model 256, 8 layers, GQA 4 query / 1 kv heads, seq 1024, batch 64 (65,536 tokens per step),
vocab 8192, N = 2e7 non-vocab params (the planner, multiple_of 16: dense SwiGLU 3040 wide; r_a 0.1 =
31 experts top-1 of width 96; r_a 0.2 = 14 experts top-2 of width 224; r_a 0.42 = 5 experts top-2 of
width 608 at r_a 0.44, the planner's nearest reachable rate). Every row trains with the real loop
(`moe_study.train.loop.train`, torch engine, bf16) on random tokens for --warmup + --steps steps; the
rate is the median step time of the timed steps (each step ends with the loop's host sync of its loss).

A variant is `backend:compile:graph`: backend = train.expert_backend (torch_grouped | fused | cutlass |
auto), compile = none | default | reduce-overhead | max-autotune-no-cudagraphs (train.compile /
compile_mode), graph = 0 | 1 (train.cuda_graph: the whole step as two CUDA graphs). Each may be `auto`
(the params default, resolved by moe_study/train/speed.py); `auto:auto:auto` also leaves train.engine at
auto, i.e. the study's defaults (the row's `speed_defaults` says what they resolved to). Dense rows ignore
the backend.

`--profile RUN@VARIANT[;...]` records 3 steps with torch.profiler after warm-up and summarises where a
step goes: device events per step, GPU-busy time against wall time, host syncs (cudaStreamSynchronize,
cudaDeviceSynchronize, cudaEventSynchronize, device-to-host copies), launch calls, and the top kernels.

`--pack N` trains N copies of the first run@variant at once in separate processes (a file barrier
lines up their timed steps), each with its share of the cores as a packed pipeline job has
(moe_study/train/gpu_slots.py `cpu_threads`), and reports each one's and the aggregate tokens/s.

`--study FILE` measures that study's own runs instead of the 20M family (names as in its plan, lr grids
expanded; its batch, sequence length and vocabulary), e.g. `--study studies/gpu_study.yaml --runs
s_r09_s0_lr3e-3 --variants auto:auto:auto --pack 1,4`.

    python bench/study_step.py --out results/perf/study_step_h200.jsonl \\
        --runs dense,r10,r20,r42 --variants torch_grouped:default:0,torch_grouped:default:1

On a machine without CUDA it runs too, slowly (a smoke test:
`python bench/study_step.py --runs r10 --variants torch_grouped:none:0 --steps 1 --warmup 1 --batch 2`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import RandomLoader  # noqa: E402

from kernels import profiling  # noqa: E402
from moe_study.accounting import plan_run, train_flops  # noqa: E402
from moe_study.config.schema import parse_params  # noqa: E402
from moe_study.model.lm import build_model  # noqa: E402
from moe_study.train.engine import resolve_device, speed_config  # noqa: E402
from moe_study.train.loop import train  # noqa: E402
from moe_study.train.trainlog import mfu  # noqa: E402

STUDY_PARAMS: dict[str, Any] = {
    "study": "bench_study",
    "corpus": {"sources": [{"kind": "synthetic"}]},
    "budget": {"params": 2e7, "compute": 1e17, "unique_tokens": 10**10, "params_tol": 0.05,
               "compute_convention": "6n"},
    "model": {"d_model": 256, "n_layers": 8, "n_heads": 4, "n_kv_heads": 1, "seq_len": 1024, "multiple_of": 16},
    "runs": {
        "dense": {"kind": "dense"},
        "r10": {"kind": "moe", "activation_rate": 0.1, "top_k": 1},
        "r20": {"kind": "moe", "activation_rate": 0.2, "top_k": 2},
        "r42": {"kind": "moe", "activation_rate": 0.44, "top_k": 2},
    },
    "train": {"batch_size": 64, "lr": 1e-3, "warmup_steps": 5, "dtype": "bf16", "engine": "torch",
              "log_every": 10**6, "checkpoint_every": 0},
}
PROFILED_STEPS = 3
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def base_params(study: str | None) -> dict[str, Any]:
    """The 20M family above, or a study file's own runs (`--study`: its lr grids expanded, so run names
    are as in its plan, e.g. s_r09_s0_lr3e-3), with the bench's no-log, no-checkpoint train settings."""
    if study is None:
        return json.loads(json.dumps(STUDY_PARAMS))
    import yaml

    from moe_study.config.load import expanded_text

    raw = yaml.safe_load(expanded_text(study))
    raw["train"] = {**raw.get("train", {}), "log_every": 10**6, "checkpoint_every": 0}
    if not torch.cuda.is_available():  # the smoke test on a CPU machine (a GPU study names device cuda)
        raw["train"]["device"] = "cpu"
    return raw


def params(batch: int | None, backend: str, compile_: str, graph: str, study: str | None = None,
           threads: int = 0) -> Any:
    raw = base_params(study)
    raw.setdefault("train", {})
    raw["train"] |= {"expert_backend": backend, "threads": threads}
    if batch is not None:
        raw["train"]["batch_size"] = batch
    if compile_ != "auto":
        raw["train"] |= {"compile": compile_ != "none",
                         "compile_mode": None if compile_ in ("none", "default") else compile_}
    if graph != "auto":
        raw["train"]["cuda_graph"] = graph == "1"
    if (backend, compile_, graph) == ("auto", "auto", "auto"):
        raw["train"].pop("engine", None)
    return parse_params(raw)


class BenchLoader(RandomLoader):
    """Random batches; optionally waits at batch `barrier_at` until `barrier_n` processes got there, and
    advances a profiler once per step."""

    def __init__(self, batch: int, seq_len: int, vocab: int, prof: Any = None, barrier: Path | None = None,
                 barrier_n: int = 0, barrier_at: int = 0) -> None:
        super().__init__(batch, seq_len, vocab)
        self.prof, self.barrier, self.barrier_n, self.barrier_at = prof, barrier, barrier_n, barrier_at

    def __next__(self) -> torch.Tensor:
        if self.prof is not None:
            self.prof.step()
        if self.barrier is not None and self.served == self.barrier_at:
            self.barrier.mkdir(parents=True, exist_ok=True)
            (self.barrier / f"{os.getpid()}").touch()
            while len(list(self.barrier.iterdir())) < self.barrier_n:
                time.sleep(0.01)
        return super().__next__()


def summarize_profile(prof: Any, steps: int, step_s: float) -> dict[str, Any]:
    spans = profiling.kernel_spans(prof)
    cpu = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU)
    kernels = Counter(s.name for s in spans)
    ktime: Counter[str] = Counter()
    for s in spans:
        ktime[s.name] += s.end_us - s.start_us
    busy = profiling.busy_us(spans) / steps
    return {
        "device_events_per_step": round(len(spans) / steps, 1),
        "distinct_kernels": len(kernels),
        "gpu_busy_ms_per_step": round(busy / 1e3, 3),
        "gpu_busy_fraction": round(busy / 1e3 / (step_s * 1e3), 3),
        "host_syncs_per_step": {k: round(cpu[k] / steps, 1) for k in SYNC_CALLS if cpu[k]},
        "memcpy_dtoh_per_step": round(sum(v for k, v in kernels.items() if "DtoH" in k) / steps, 1),
        "launches_per_step": {k: round(v / steps, 1) for k, v in cpu.items()
                              if k in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                                       "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaMemsetAsync")},
        "gpu_share": profiling.shares(spans),
        "top_kernels_ms_per_step": [(n[:90], round(t / 1e3 / steps, 3), round(kernels[n] / steps, 1))
                                    for n, t in ktime.most_common(15)],
    }


def measure(run: str, variant: str, steps: int, warmup: int, batch: int | None, vocab: int | None,
            profile: bool = False, barrier: Path | None = None, barrier_n: int = 0, study: str | None = None,
            threads: int = 0) -> dict[str, Any]:
    backend, compile_, graph = variant.split(":")
    p = params(batch, backend, compile_, graph, study, threads)
    vocab = vocab or (p.tokenizer.vocab_size if study else 8192)
    plan = plan_run(p, run)
    torch.manual_seed(0)
    ran = speed_config(p.train, resolve_device(p.train.device), plan.batch_size)[0]  # as the train stage builds it
    model = build_model(plan.arch.to_dict(), vocab, ran.expert_backend)
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity, schedule

        prof = torch.profiler.profile(
            activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available(),
            schedule=schedule(wait=max(0, warmup - 1), warmup=1, active=PROFILED_STEPS, repeat=1))
        prof.__enter__()
        steps = PROFILED_STEPS
    loader = BenchLoader(plan.batch_size, plan.arch.seq_len, vocab, prof, barrier, barrier_n, warmup)
    fpt = train_flops(plan.arch.nonvocab_active, 1)
    t0 = time.perf_counter()
    trainer, metrics = train(model, loader, p.train, steps=steps + warmup, batch_size=plan.batch_size,
                             lr=p.train.lr, seed=0, flops_per_token=fpt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    times = [h.seconds for h in trainer.history[warmup:]]
    step_s = statistics.median(times)
    tok_s = plan.tokens_per_step / step_s
    a = plan.arch
    row: dict[str, Any] = {
        "run": run, "variant": variant, "kind": a.kind, "experts": a.experts, "top_k": a.top_k,
        "ffn_hidden": a.ffn_hidden, "nonvocab_params": a.nonvocab_total, "nonvocab_active": a.nonvocab_active,
        "activation_rate": round(a.activation_rate, 4), "expert_backend": backend, "compile": compile_,
        "cuda_graph": metrics.get("cuda_graph", False), "cuda_graph_fallback": metrics.get("cuda_graph_fallback"),
        "engine": metrics["engine"], "speed_defaults": metrics.get("speed_defaults"),
        "batch": plan.batch_size, "seq_len": a.seq_len, "vocab": vocab, "steps_timed": len(times),
        "d_model": a.d_model, "n_layers": a.n_layers, "study": study, "threads": torch.get_num_threads(),
        "ms_per_step": round(step_s * 1e3, 2), "ms_min": round(min(times) * 1e3, 2),
        "ms_max": round(max(times) * 1e3, 2), "tokens_per_s": round(tok_s),
        "mfu_6n": None if trainer.peak_flops is None else round(mfu(fpt, tok_s, trainer.peak_flops), 4),
        "expert_backends": sorted({v for k, v in (metrics["expert_backends"] or {}).items()
                                   if not k.endswith("fallback") and v}),
        "loss_first": round(trainer.history[0].loss, 4), "loss_last": round(trainer.history[-1].loss, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "wall_s": round(wall, 1),
    }
    if prof is not None:
        prof.__exit__(None, None, None)
        row["profile"] = summarize_profile(prof, PROFILED_STEPS, step_s)
    return row


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(  # GIT_COMMIT: a copy of the tree without .git
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent
    ).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "commit": commit or None}


def pack(n: int, run: str, variant: str, a: argparse.Namespace) -> dict[str, Any]:
    """N copies of run@variant in separate processes, their timed steps lined up by a file barrier."""
    barrier = Path(f"/tmp/study_step_barrier_{os.getpid()}_{n}")
    outs = [Path(f"/tmp/study_step_pack_{os.getpid()}_{i}.json") for i in range(n)]
    # each process gets its share of the cores, as a packed pipeline job does (gpu_slots.cpu_threads)
    threads = a.threads or max(1, (os.cpu_count() or 1) // n)
    common = [sys.executable, __file__, "--runs", run, "--variants", variant, "--steps", str(a.steps), "--warmup",
              str(a.warmup), "--threads", str(threads), "--barrier", str(barrier), "--barrier-n", str(n)]
    common += [f"--{k}={v}" for k, v in (("batch", a.batch), ("vocab", a.vocab), ("study", a.study)) if v]
    procs = [subprocess.Popen([*common, "--out", str(o)]) for o in outs]
    rcs = [p.wait() for p in procs]
    rows = [json.loads(o.read_text().splitlines()[-1]) for o in outs if o.exists()]
    return {"run": run, "variant": variant, "pack": n, "rcs": rcs, "mps": bool(os.environ.get("STUDY_STEP_MPS")),
            "threads_each": threads, "study": a.study,
            "tokens_per_s_each": [r["tokens_per_s"] for r in rows],
            "tokens_per_s_total": sum(r["tokens_per_s"] for r in rows),
            "ms_per_step_each": [r["ms_per_step"] for r in rows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="dense,r10,r20,r42")
    ap.add_argument("--variants", default="torch_grouped:default:0,torch_grouped:default:1")
    ap.add_argument("--study", default=None, help="a study file: measure its runs (names as in its plan)")
    ap.add_argument("--vocab", type=int, default=None, help="default 8192, or the study's tokenizer.vocab_size")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 64, or the study's)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (train.threads; 0: all cores)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--profile", default=None, help="run@variant[;run@variant]: profile 3 steps of each")
    ap.add_argument("--pack", default=None, help="N[,N]: N copies of the first run@variant at once")
    ap.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--barrier-n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="JSONL: one row per measurement (appended)")
    a = ap.parse_args(argv)
    info = machine()
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])

    def emit(r: dict[str, Any]) -> None:
        r |= {"gpu": info["gpu"], "torch": info["torch"], "commit": info["commit"], "command": cmd}
        print(json.dumps(r), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    jobs = [(r, v, False) for r in a.runs.split(",") for v in a.variants.split(",") if r and v]
    jobs += [(*spec.split("@"), True) for spec in (a.profile.split(";") if a.profile else [])]
    if a.pack:
        for n in a.pack.split(","):
            emit(pack(int(n), jobs[0][0], jobs[0][1], a))
        return 0
    for run, variant, prof in jobs:
        try:
            r = measure(run, variant, a.steps, a.warmup, a.batch if a.batch or a.study else 64, a.vocab, prof,
                        Path(a.barrier) if a.barrier else None, a.barrier_n, a.study, a.threads)
        except Exception as err:  # report and go on
            r = {"run": run, "variant": variant, "skipped": f"{type(err).__name__}: {err}"[:600]}
        r["profiled"] = prof
        emit(r)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
