"""Training throughput (tokens/s) of the study's planned architectures, per device and expert backend.

Builds each run's architecture exactly as the train stage does (moe_study.accounting.plan_run on a
params file, vocab from --vocab), and times `moe_study.train.loop.train` on random token batches of the
planned batch shape, so the figure includes everything a real step does (forward, loss, backward,
clipping, AdamW) but no data loading. The first --warmup steps are excluded from the rate.

    python bench/train_throughput.py --out results/bench/train_throughput.json
    python bench/train_throughput.py --device cuda --dtype bf16 --backends reference,torch_grouped,cutlass
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

from moe_study.accounting import plan_run  # noqa: E402
from moe_study.config.load import load_params  # noqa: E402
from moe_study.model.lm import build_model  # noqa: E402
from moe_study.train.loop import train  # noqa: E402


class RandomLoader:
    """Seeded random batches with ReplayLoader's interface; records when each batch was served."""

    def __init__(self, batch: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        self.batch, self.seq_len, self.vocab = batch, seq_len, vocab
        self.g = torch.Generator().manual_seed(seed)
        self.served = 0
        self.times: list[float] = []

    def __iter__(self) -> RandomLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.served += 1
        return torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=self.g)

    @property
    def tokens_served(self) -> int:
        return self.served * self.batch * self.seq_len

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.served = state["served"]


def measure(run: str, params_path: str, vocab: int, device: str, dtype: str, backend: str, engine: str,
            steps: int, warmup: int, threads: int) -> dict[str, Any]:
    p = load_params(params_path)
    plan = plan_run(p, run)
    cfg = p.train.model_copy(update={"device": device, "dtype": dtype, "expert_backend": backend,
                                     "engine": engine, "threads": threads, "log_every": 10**9})
    torch.manual_seed(0)
    model = build_model(plan.arch.to_dict(), vocab, backend)
    loader = RandomLoader(plan.batch_size, plan.arch.seq_len, vocab)
    t0 = time.perf_counter()
    trainer, metrics = train(model, loader, cfg, steps=steps + warmup, batch_size=plan.batch_size,
                             lr=p.run_lr(run), seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    end = time.perf_counter()
    timed_steps = steps  # from the request of the first post-warm-up batch to the end of the last step
    seconds = end - loader.times[warmup]
    tokens = timed_steps * plan.tokens_per_step
    return {
        "run": run, "kind": plan.arch.kind, "experts": plan.arch.experts, "top_k": plan.arch.top_k,
        "nonvocab_params": plan.arch.nonvocab_total, "nonvocab_active": plan.arch.nonvocab_active,
        "tokens_per_step": plan.tokens_per_step, "device": device, "dtype": dtype, "engine": engine,
        "backend_requested": backend, "expert_backends": metrics["expert_backends"], "threads": metrics["threads"],
        "steps_timed": timed_steps, "tokens_per_second": round(tokens / seconds, 1),
        "ms_per_step": round(seconds / timed_steps * 1e3, 3),
        "final_loss": round(trainer.history[-1].loss, 4), "wall_s_total": round(end - t0, 2),
        "planned_steps": plan.steps,
        "eta_full_run_s": round(plan.steps * seconds / timed_steps, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--runs", default=None, help="comma-separated run names (default: all in params)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--backends", default="auto", help="expert backends for MoE runs, comma-separated")
    ap.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    ap.add_argument("--steps", type=int, default=30, help="timed steps (at least 1)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="write JSON here (and a .md table beside it)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bf16" if device == "cuda" else "fp32")
    runs = a.runs.split(",") if a.runs else list(load_params(a.params).runs)
    rows = []
    for run in runs:
        kind = plan_run(load_params(a.params), run).arch.kind
        for backend in (a.backends.split(",") if kind == "moe" else ["auto"]):
            try:
                r = measure(run, a.params, a.vocab, device, dtype, backend, a.engine, a.steps, a.warmup, a.threads)
            except Exception as err:  # report and go on: one failing backend must not hide the others
                r = {"run": run, "backend_requested": backend, "skipped": f"{type(err).__name__}: {err}"[:300]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.machine()}
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(),
                                                    *(argv if argv is not None else sys.argv[1:])]),
                  "machine": info, "rows": rows}
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        lines = [f"# Training throughput ({device}, {dtype}, engine {a.engine}, vocab {a.vocab})", "",
                 f"`{report['command']}`", "",
                 "| run | kind | E/k | backend | tokens/s | ms/step | full run ETA s |",
                 "| --- | --- | --- | --- | ---: | ---: | ---: |"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['run']} | | | {r['backend_requested']} | skipped: {r['skipped'][:100]} | | |")
                continue
            ek = f"{r['experts']}/{r['top_k']}" if r["kind"] == "moe" else "-"
            used = sorted({v for k, v in (r["expert_backends"] or {}).items() if not k.endswith("fallback") and v})
            lines.append(f"| {r['run']} | {r['kind']} | {ek} | {','.join(used) or '-'} | "
                         f"{r['tokens_per_second']:.0f} | {r['ms_per_step']:.1f} | {r['eta_full_run_s']:.0f} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
