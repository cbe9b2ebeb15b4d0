"""train@run: train one dense or MoE LM on its replayed token stream, exactly plan["steps"] steps.

Inputs: the run's plan.json (architecture, steps, tokens), its replay.json (the epoch-replay data
plan, read through stages.shards.ReplayLoader) and the token manifest (vocab size, EOS id).
Outputs: work/runs/<run>/model/ (model.safetensors + config.json, renamed into place at the
end), work/runs/<run>/train_log.csv (one row per step) and work/runs/<run>/train.json (metrics
and provenance, written last).

Recipe (the same for every run, so only the architecture and the data reuse differ): AdamW with
betas (0.9, 0.95) and decoupled weight decay on matrices only (embeddings and expert tensors
included, norm weights excluded), linear warmup then cosine decay to min_lr_ratio * lr, global
grad-norm clipping, cross-entropy plus aux_loss_coef * load-balancing loss (and z_loss_coef *
router z-loss) for MoE. The step count, and so the token count, is the plan's: the run must
consume exactly its compute budget C = 6 N_active T, which is checked against the loader.

Engines: "torch" (a plain loop) and "deepspeed" (ZeRO stage 1 through deepspeed.initialize; on a
CPU it runs as a single gloo-free process with DS_ACCELERATOR=cpu and torch's AdamW). Both share
the loop below; only how a step is applied differs.

Determinism: on CPU, the same inputs, seed and thread count give byte-identical weights (the
data order is fixed by the replay, the init by the seed, and every CPU op used is deterministic).
The loop is a `Trainer` whose `state_dict()` holds model, optimizer, loader position, step and RNG
state, so a checkpoint/resume layer can be added without touching the loop.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from stages.audit import audit_run
from stages.common import (
    WORK,
    atomic_path,
    n_workers,
    per_run_main,
    provenance,
    read_json,
    sha256_file,
    write_bytes,
    write_json,
)
from stages.model import LM, build_model, count_nonvocab_params, save_model
from stages.schema import Params, TrainConfig

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
TOKENS_DIR = WORK / "tokens"
CODE_MODULES = ["stages.model", "stages.shards", "stages.audit", "kernels.grouped_gemm", "kernels"]

log = logging.getLogger("stages.train")


class TrainError(ValueError):
    """Inputs that cannot be trained on as planned (the message names the file or field)."""


class BatchLoader(Protocol):
    """What the loop needs from stages.shards.ReplayLoader (tests use a tiny in-memory twin)."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def __next__(self) -> torch.Tensor: ...
    @property
    def tokens_served(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# -------------------------------------------------------------------------------------- schedule
def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_ratio*lr."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = min_ratio * lr
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - floor)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (dim >= 2: linear, embedding, expert tensors), not norm weights."""
    decay = [p for _, p in sorted(model.named_parameters()) if p.dim() >= 2]
    no_decay = [p for _, p in sorted(model.named_parameters()) if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but no CUDA device is visible (use auto or cpu)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------- engines
class TorchEngine:
    """Plain PyTorch: AdamW, clip_grad_norm_, autocast for bf16."""

    name = "torch"

    def __init__(self, model: LM, cfg: TrainConfig, lr: float, device: torch.device) -> None:
        self.module = model.to(device)
        self.device = device
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=ADAM_BETAS,
                                           eps=ADAM_EPS, foreach=device.type == "cuda")

    def forward(self, x: torch.Tensor) -> Any:
        with autocast_context(self.device, self.cfg.dtype):
            return self.module(x)

    def backward_step(self, loss: torch.Tensor, lr: float) -> float:
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DeepSpeedEngine:
    """DeepSpeed ZeRO-1 (optimizer state partitioning; with one process it is a reference point).

    On CPU: DS_ACCELERATOR=cpu, fp32, torch's AdamW ("torch_adam"), and single-process rendezvous
    variables. The first use compiles DeepSpeed's shared-memory comm op with g++ (~40 s, cached in
    ~/.cache/torch_extensions).
    """

    name = "deepspeed"

    def __init__(self, model: LM, cfg: TrainConfig, lr: float, device: torch.device, batch_size: int) -> None:
        os.environ.setdefault("DS_ACCELERATOR", device.type)
        if device.type == "cpu" and cfg.dtype != "fp32":
            raise TrainError("train.engine=deepspeed on CPU needs train.dtype=fp32")
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        self.device = device
        self.cfg = cfg
        config = {
            "train_batch_size": batch_size,
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                                                      "weight_decay": cfg.weight_decay, "torch_adam": True}},
            "bf16": {"enabled": cfg.dtype == "bf16"},
            "steps_per_print": 1 << 62,
            "wall_clock_breakdown": False,
        }
        model = model.to(device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=config)
        self.module: LM = self.engine.module

    def forward(self, x: torch.Tensor) -> Any:
        return self.engine(x)

    def backward_step(self, loss: torch.Tensor, lr: float) -> float:
        self.engine.backward(loss)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def make_engine(model: LM, cfg: TrainConfig, lr: float, device: torch.device, batch_size: int) -> Any:
    if cfg.engine == "torch":
        return TorchEngine(model, cfg, lr, device)
    return DeepSpeedEngine(model, cfg, lr, device, batch_size)


# ------------------------------------------------------------------------------------------ loop
@dataclass
class StepStats:
    step: int
    loss: float  # cross-entropy (nats per token), without the auxiliary losses
    lr: float
    tokens: int  # cumulative target tokens after this step
    aux_loss: float
    z_loss: float
    grad_norm: float


@dataclass
class Trainer:
    """The training loop of one run; `state_dict()` is everything a resume needs."""

    engine: Any
    loader: BatchLoader
    steps: int
    batch_size: int
    seq_len: int
    vocab_size: int
    lr: float
    cfg: TrainConfig
    step: int = 0
    history: list[StepStats] = field(default_factory=list)
    load_sum: torch.Tensor | None = None  # (layers, E) sum over steps of the routed fraction
    seconds: float = 0.0

    def _batch(self, it: Iterator[torch.Tensor]) -> torch.Tensor:
        try:
            batch = next(it)
        except StopIteration:
            raise TrainError(f"the replay stream ended after {self.step} of {self.steps} steps "
                             "(replay.json and plan.json disagree: re-run replay)") from None
        want = (self.batch_size, self.seq_len + 1)
        if tuple(batch.shape) != want:
            raise TrainError(f"batch {self.step} has shape {tuple(batch.shape)}, expected {want}")
        lo, hi = int(batch.min()), int(batch.max())
        if lo < 0 or hi >= self.vocab_size:
            raise TrainError(f"batch {self.step} holds token id {hi if hi >= self.vocab_size else lo} "
                             f"outside the vocabulary [0, {self.vocab_size})")
        return batch

    def train_step(self, batch: torch.Tensor) -> StepStats:
        device = self.engine.device
        batch = batch.to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        lr = lr_at(self.step, self.steps, self.lr, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
        out = self.engine.forward(x)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        loss = ce + self.cfg.aux_loss_coef * out.aux_loss + self.cfg.z_loss_coef * out.z_loss
        norm = self.engine.backward_step(loss, lr)
        if out.load is not None:
            load = out.load.detach().double().cpu()
            self.load_sum = load if self.load_sum is None else self.load_sum + load
        self.step += 1
        return StepStats(self.step, float(ce.detach()), lr, self.step * self.batch_size * self.seq_len,
                         float(out.aux_loss.detach()), float(out.z_loss.detach()), norm)

    def run(self) -> list[StepStats]:
        it = iter(self.loader)
        t0 = time.perf_counter()
        start_step, start_seconds = self.step, self.seconds
        self.engine.module.train()
        while self.step < self.steps:
            s = self.train_step(self._batch(it))
            self.history.append(s)
            self.seconds = start_seconds + time.perf_counter() - t0
            if s.step % self.cfg.log_every == 0 or s.step == self.steps or s.step == start_step + 1:
                done = s.step - start_step
                rate = done * self.batch_size * self.seq_len / max(self.seconds - start_seconds, 1e-9)
                eta = (self.steps - s.step) * self.batch_size * self.seq_len / max(rate, 1e-9)
                log.info("step %d/%d loss %.4f aux %.4f lr %.3g grad %.3f | %.0f tok/s ETA %s",
                         s.step, self.steps, s.loss, s.aux_loss, s.lr, s.grad_norm, rate, _fmt_seconds(eta))
        return self.history

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds, "engine": self.engine.state_dict(),
                "loader": self.loader.state_dict(), "history": [vars(h) for h in self.history],
                "load_sum": self.load_sum, "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self.engine.load_state_dict(state["engine"])
        self.loader.load_state_dict(state["loader"])
        self.history = [StepStats(**h) for h in state["history"]]
        self.load_sum = state["load_sum"]
        torch.set_rng_state(state["rng"])


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -------------------------------------------------------------------------------------- metrics
def load_stats(load_sum: torch.Tensor | None, steps: int) -> dict[str, Any] | None:
    """Fraction of routed slots per expert (averaged over steps) and how far from uniform it is."""
    if load_sum is None:
        return None
    mean = load_sum / max(1, steps)  # (layers, E), each row sums to 1
    E = mean.shape[1]
    return {
        "fraction_per_expert": [[round(float(v), 6) for v in row] for row in mean],
        "max_over_uniform": [round(float(row.max() * E), 6) for row in mean],
        "min_over_uniform": [round(float(row.min() * E), 6) for row in mean],
        "cv": [round(float(row.std(unbiased=False) / row.mean()), 6) for row in mean],
    }


def summarize(history: list[StepStats], trainer: Trainer) -> dict[str, Any]:
    tail = history[-max(1, len(history) // 10):]
    tokens = trainer.step * trainer.batch_size * trainer.seq_len
    seconds = trainer.seconds
    return {
        "steps": trainer.step,
        "tokens": tokens,
        "final_train_loss": sum(h.loss for h in tail) / len(tail),
        "final_train_loss_steps": len(tail),
        "first_train_loss": history[0].loss if history else None,
        "final_aux_loss": sum(h.aux_loss for h in tail) / len(tail),
        "final_z_loss": sum(h.z_loss for h in tail) / len(tail),
        "wall_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "expert_load": load_stats(trainer.load_sum, trainer.step),
    }


def log_csv(history: list[StepStats]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss", "lr", "tokens", "aux_loss", "grad_norm"])
    for h in history:
        w.writerow([h.step, repr(h.loss), repr(h.lr), h.tokens, repr(h.aux_loss), repr(h.grad_norm)])
    return buf.getvalue().encode()


# ---------------------------------------------------------------------------------------- stage
def check_plan(plan: dict[str, Any], plan_path: Path | str, cfg: TrainConfig) -> None:
    """The plan fields the loop relies on, and that it matches the current train section."""
    for key in ("arch", "steps", "batch_size", "tokens", "tokens_per_step"):
        if key not in plan:
            raise TrainError(f"{plan_path}: missing key {key!r} (re-run the plan stage)")
    if plan["batch_size"] != cfg.batch_size:
        raise TrainError(f"{plan_path}: batch_size={plan['batch_size']} but train.batch_size="
                         f"{cfg.batch_size} (the plan is stale: re-run plan)")
    if plan["tokens"] != plan["steps"] * plan["batch_size"] * plan["arch"]["seq_len"]:
        raise TrainError(f"{plan_path}: tokens={plan['tokens']} != steps * batch_size * seq_len")


def train(
    model: LM,
    loader: BatchLoader,
    cfg: TrainConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[Trainer, dict[str, Any]]:
    """Train `model` for `steps` steps on `loader`; returns the trainer and its summary metrics."""
    torch.set_num_threads(n_workers(cfg.threads))
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    engine = make_engine(model, cfg, lr, device, batch_size)
    trainer = Trainer(engine=engine, loader=loader, steps=steps, batch_size=batch_size,
                      seq_len=model.arch.seq_len, vocab_size=model.vocab_size, lr=lr, cfg=cfg)
    history = trainer.run()
    metrics = summarize(history, trainer)
    metrics["device"] = str(device)
    metrics["engine"] = engine.name
    metrics["dtype"] = cfg.dtype
    metrics["threads"] = torch.get_num_threads()
    metrics["expert_backends"] = engine.module.expert_backends() or None
    return trainer, metrics


def run_dir(run: str, work: Path = WORK) -> Path:
    return work / "runs" / run


def run_train(p: Params, run: str, work: Path = WORK, loader: BatchLoader | None = None) -> dict[str, Any]:
    """The stage: read plan/replay/tokens manifest, train, write model/, train_log.csv, train.json."""
    from stages.shards import ReplayLoader, tokens_meta

    p.run(run)
    cfg, lr, seed = p.train, p.run_lr(run), p.run_seed(run)
    rdir = run_dir(run, work)
    plan_path, replay_path = rdir / "plan.json", rdir / "replay.json"
    plan = read_json(plan_path)
    check_plan(plan, plan_path, cfg)
    replay = read_json(replay_path)
    tokens_dir = work / "tokens"
    tm = tokens_meta(tokens_dir)
    for key in ("vocab_size", "eos_id"):
        if key in replay and replay[key] != tm[key]:
            raise TrainError(f"{replay_path}: {key}={replay[key]} but {tokens_dir}/manifest.json says "
                             f"{tm[key]} (re-run replay)")
    if replay.get("seq_len", plan["arch"]["seq_len"]) != plan["arch"]["seq_len"]:
        raise TrainError(f"{replay_path}: seq_len={replay['seq_len']} differs from the plan's "
                         f"{plan['arch']['seq_len']} (re-run replay)")
    torch.manual_seed(seed)  # the init depends on the seed only
    model = build_model(plan["arch"], tm["vocab_size"], cfg.expert_backend)
    total, active = count_nonvocab_params(model)
    if (total, active) != (plan["nonvocab_params"], plan["nonvocab_active"]):
        raise TrainError(f"model has N={total}, N_active={active} but {plan_path} says "
                         f"N={plan['nonvocab_params']}, N_active={plan['nonvocab_active']}")
    log.info("%s: %s N=%d N_active=%d, %d steps x %d tokens, lr %.3g seed %d", run, plan["arch"]["kind"],
             total, active, plan["steps"], plan["tokens_per_step"], lr, seed)
    loader = loader if loader is not None else ReplayLoader(replay_path, plan["batch_size"])
    trainer, metrics = train(model, loader, cfg, steps=plan["steps"], batch_size=plan["batch_size"], lr=lr,
                             seed=seed)
    if loader.tokens_served != plan["tokens"] or metrics["tokens"] != plan["tokens"]:
        raise TrainError(f"consumed {loader.tokens_served} tokens (loop counted {metrics['tokens']}) but the "
                         f"plan budgets {plan['tokens']}: the compute budget was not met")

    inputs = {"plan": sha256_file(plan_path), "replay": sha256_file(replay_path), "tokens": tm["sha256"]}
    section = {"train": cfg.model_dump(), f"runs.{run}": p.run(run).model_dump(), "lr": lr, "seed": seed}
    prov = provenance("train", inputs, section, CODE_MODULES)
    config = {"arch": plan["arch"], "vocab_size": tm["vocab_size"], "eos_id": tm["eos_id"],
              "nonvocab_params": total, "nonvocab_active": active, "run": run, "provenance": prov}
    engine = trainer.engine
    with atomic_path(rdir / "model") as tmp:
        save_model(engine.module, tmp, config)
    write_bytes(rdir / "train_log.csv", log_csv(trainer.history))
    result = {"run": run, "kind": plan["arch"]["kind"], "nonvocab_params": total, "nonvocab_active": active,
              "tokens_seen": loader.tokens_served, "plan_tokens": plan["tokens"], "lr": lr, "seed": seed,
              **metrics, "provenance": prov}
    result["audit"] = audit_run(plan, engine.module, loader.tokens_served)  # plan vs module, loader, flop counter
    write_json(rdir / "train.json", result)
    log.info("%s: final train loss %.4f, %d tokens in %.1fs (%.0f tok/s)", run, result["final_train_loss"],
             result["tokens_seen"], result["wall_seconds"], result["tokens_per_second"] or 0)
    return result


def main(argv: list[str] | None = None) -> int:
    return per_run_main("train", __doc__, run_train, (TrainError,), argv)


if __name__ == "__main__":
    raise SystemExit(main())
