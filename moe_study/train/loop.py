"""The training loop: train one dense or MoE LM on its replayed token stream, exactly plan["steps"] steps.

Inputs: the run's plan.json (architecture, steps, tokens), its replay.json (the epoch-replay data
plan, read through moe_study.data.shards.ReplayLoader) and the token manifest (vocab size, EOS id).
Outputs: work/runs/<run>/model/ (model.safetensors + HF-style config.json, renamed into place at
the end), steps.parquet (one row per step: loss, lr, grad norm, tokens, tokens/s, MFU, MoE load;
the run's one per-step record), dvclive/ (the same curves for `dvc plots` / `dvc exp show`) and
train.json (metrics and provenance, written last).

Recipe (the same for every run, so only the architecture and the data reuse differ): AdamW with
betas (0.9, 0.95) and decoupled weight decay on matrices only, linear warmup then cosine (or
warmup-stable-decay) to min_lr_ratio * lr, global grad-norm clipping, cross-entropy plus
aux_loss_coef * load-balancing loss (and z_loss_coef * router z-loss) for MoE. The step count, and
so the token count, is the plan's: the run consumes exactly its compute budget C = 6 N_active T.

Engines (moe_study/train/engine.py): DeepSpeed (ZeRO-1/2, config generated from `train:`) and a plain-torch
twin; `train.engine: auto` picks (torch on CPU and on one GPU, DeepSpeed on several), train.json names it.
The other "auto" speed choices (expert backend, torch.compile, the step as CUDA graphs) come from the
table of measurements in moe_study/train/speed.py; train.json's `speed_defaults` (GPU runs) says what
they resolved to and why an "auto" stayed off. Several GPUs:
`train.gpus: N` re-launches this command under torchrun (one process per GPU, the same code);
each process trains on its share of every global batch.

Resume and failure (moe_study/train/checkpoint.py): a checkpoint every train.checkpoint_every steps and at
the end, in work/ckpt/<run>/<key>/ outside the stage's outputs; a killed run (kill -9 included)
re-run with the same inputs, params and code continues from the last checkpoint and produces the
same loss curve as an uninterrupted run. A NaN/Inf loss, or a pre-clip gradient norm that is
non-finite or above train.max_grad_norm, stops the run with an error naming the step (exit code 2);
the last good checkpoint stays. Fault injection, for tests and drills only: the environment
variable TRAIN_FAULT=nan_loss@K (the loss of step K becomes NaN) or grad_spike@K (the loss of
step K is scaled by 1e12, so its gradient explodes); the run logs a warning when it is set.

Determinism: on CPU, the same inputs, seed and thread count give byte-identical weights (the
data order is fixed by the replay, the init by the seed, and every CPU op used is deterministic).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_study.accounting import exact_train_flops
from moe_study.config.schema import Params, TrainConfig, batch_split
from moe_study.hashing import sha256_file, write_file_list
from moe_study.io import WORK, atomic_path, read_json, write_json
from moe_study.model.lm import LM, build_model, count_nonvocab_params, save_model
from moe_study.provenance import provenance
from moe_study.train import checkpoint, gpu_slots
from moe_study.train.audit import audit_run
from moe_study.train.engine import (
    EngineError,
    engine_choice,
    init_distributed,
    make_engine,
    resolve_device,
    schedule_lr,
    speed_config,
)
from moe_study.train.launch import dist_env
from moe_study.train.trainlog import (
    StepStats,
    device_peak_flops,
    load_stats,
    mfu,
    step_load_fields,
    write_dvclive,
    write_steps_parquet,
)

TOKENS_DIR = WORK / "tokens"
FAULT_ENV = "TRAIN_FAULT"

log = logging.getLogger("stages.train")


class TrainError(ValueError):
    """Inputs that cannot be trained on as planned (the message names the file or field)."""


class NonFiniteError(TrainError):
    """The loss or the gradient norm blew up; the last good checkpoint is kept."""


class BatchLoader(Protocol):
    """What the loop needs from moe_study.data.shards.ReplayLoader (tests use a tiny in-memory twin)."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def __next__(self) -> torch.Tensor: ...
    @property
    def tokens_served(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def fault_from_env() -> tuple[str, int] | None:
    """TRAIN_FAULT=nan_loss@K or grad_spike@K (see the module docstring), else None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, _, at = spec.partition("@")
    if kind not in ("nan_loss", "grad_spike") or not at.isdigit():
        raise TrainError(f"{FAULT_ENV}={spec!r}: expected nan_loss@STEP or grad_spike@STEP")
    log.warning("%s=%s: fault injection is on (a drill, not a real run)", FAULT_ENV, spec)
    return kind, int(at)


# ------------------------------------------------------------------------------------------ loop
def _all_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
        t /= world
    return t


def step_values_to_host(means: torch.Tensor, norm: torch.Tensor | None, world: int) -> torch.Tensor:
    """A step's numbers on the host with one all-reduce and one device-to-host copy.

    `means` (float64: cross-entropy, aux, z, then the flattened (layers, E) load; each this process's
    mean over its micro-batches) is averaged over processes; the pre-clip gradient norm is appended
    after the reduction (it is already global: the engine all-reduced the gradients before taking it).
    Why one packed tensor: every separate all-reduce or `.cpu()` is a stall of the host on the GPU;
    the loop needs these values every step anyway (the NaN / spike stop checks the loss and the norm
    before the update, and every step is a row of steps.parquet). float64, not float32: the loss
    is a mean over micro-batches, and float64 keeps the logged values what they were (byte-identical
    CPU runs); the tensor is tiny (3 + layers * E numbers).
    """
    means = _all_mean(means, world)
    if norm is not None:
        means = torch.cat([means, norm.detach().reshape(1).to(means.dtype)])
    return means.cpu()


@dataclass
class Trainer:
    """The training loop of one run; `state_dict()` / checkpoints hold everything a resume needs."""

    engine: Any
    loader: BatchLoader
    steps: int
    batch_size: int  # global: sequences per optimizer step over all processes
    seq_len: int
    vocab_size: int
    lr: float
    cfg: TrainConfig
    step: int = 0
    history: list[StepStats] = field(default_factory=list)
    load_sum: torch.Tensor | None = None  # (layers, E) sum over steps of the routed fraction
    seconds: float = 0.0
    flops_per_token: float | None = None  # the planner's training FLOPs per token (for MFU)
    peak_flops: float | None = None  # device peak FLOP/s (None: MFU null)
    ckpt_dir: Path | None = None  # checkpoints every cfg.checkpoint_every steps and at the end
    fault: tuple[str, int] | None = None
    last_checkpoint: Path | None = None

    def __post_init__(self) -> None:
        self.rank, self.world, _ = dist_env()
        try:  # the same split as params.yaml validation and the DeepSpeed config
            self.micro, self.accumulation = batch_split(self.batch_size, self.world, self.cfg.micro_batch_size)
        except ValueError as err:
            raise TrainError(f"{err} ({self.world} processes launched)") from None

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

    def _blew_up(self, what: str) -> NonFiniteError:
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written yet")
        return NonFiniteError(f"step {self.step + 1}: {what}; training stopped ({kept})")

    def _check_norm(self, norm: float) -> None:
        if not norm <= self.cfg.max_grad_norm:  # NaN fails this too
            raise self._blew_up(f"gradient norm {norm:.4g} is not below train.max_grad_norm={self.cfg.max_grad_norm:g}")

    def train_step(self, batch: torch.Tensor) -> StepStats:
        """One optimizer step on this process's share of the global batch, in micro-batches."""
        t0 = time.perf_counter()
        device = self.engine.device
        share = self.batch_size // self.world
        rows = batch[self.rank * share:(self.rank + 1) * share]
        lr = schedule_lr(self.cfg, self.step, self.steps, self.lr)
        graphs = getattr(self.engine, "graphs", None)
        if graphs is not None:  # train.cuda_graph: the same step as two CUDA graphs (moe_study/train/cudagraph.py)
            packed, norm, load_shape = graphs.forward_backward(rows.to(device, non_blocking=True), self._loss)
        else:
            packed, norm, load_shape = self._micro_steps(rows, device)
        host = step_values_to_host(packed / self.accumulation, norm, self.world)  # the step's only host sync
        ce_v, aux_v, z_v = (float(v) for v in host[:3])
        if not all(map(math.isfinite, (ce_v, aux_v, z_v))):
            raise self._blew_up(f"non-finite loss (cross-entropy {ce_v}, aux {aux_v}, z {z_v})")
        norm_v = float(host[-1]) if norm is not None else None
        if norm_v is not None:
            self._check_norm(norm_v)
        after = self.engine.step(lr, norm)
        if after is not None:
            norm_v = after
            self._check_norm(norm_v)
        update_bias = getattr(self.engine.module, "update_router_bias", None)  # issue 5's aux-loss-free balancing
        if callable(update_bias):
            update_bias()
        stats_load = None
        if load_shape is not None:
            stats_load = host[3:3 + math.prod(load_shape)].reshape(load_shape).clone()
            self.load_sum = stats_load if self.load_sum is None else self.load_sum + stats_load
        self.step += 1
        seconds = time.perf_counter() - t0
        tokens_step = self.batch_size * self.seq_len
        rate = tokens_step / max(seconds, 1e-12)
        return StepStats(self.step, ce_v, lr, self.step * tokens_step, aux_v, z_v, norm_v, seconds=seconds,
                         tokens_per_s=rate, mfu=mfu(self.flops_per_token, rate, self.peak_flops),
                         **step_load_fields(stats_load))

    def _loss(self, out: Any) -> torch.Tensor:
        """The training loss of a forward's output (what the step graph captures; no fault injection there)."""
        return out.ce + self.cfg.aux_loss_coef * out.aux_loss + self.cfg.z_loss_coef * out.z_loss

    def _micro_steps(self, rows: torch.Tensor, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
        """Forward and backward of each micro-batch: (packed step values, pre-clip norm, load shape)."""
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # ce, aux, z over micro-batches
        load = None
        for m in range(self.accumulation):
            mb = rows[m * self.micro:(m + 1) * self.micro].to(device, non_blocking=True)
            x, y = mb[:, :-1], mb[:, 1:]
            out = self.engine.forward(x, y)  # the model's own cross-entropy (compiled with train.compile)
            ce = out.ce
            loss = ce + self.cfg.aux_loss_coef * out.aux_loss + self.cfg.z_loss_coef * out.z_loss
            if self.fault and self.fault[1] == self.step + 1:
                loss = loss * (float("nan") if self.fault[0] == "nan_loss" else 1e12)
                ce = ce * float("nan") if self.fault[0] == "nan_loss" else ce
            self.engine.backward(loss, self.accumulation)
            sums += torch.stack([ce.detach(), out.aux_loss.detach(), out.z_loss.detach()]).double()
            if out.load is not None:
                load = out.load.detach().double() if load is None else load + out.load.detach().double()
        # the pre-clip norm, a device tensor: the torch engine knows it before the update (None: deepspeed, after it)
        norm = self.engine.grad_norm()
        packed = sums if load is None else torch.cat([sums, load.reshape(-1)])
        return packed, norm, None if load is None else tuple(load.shape)

    def run(self) -> list[StepStats]:
        it = iter(self.loader)
        t0 = time.perf_counter()
        start_step, start_seconds = self.step, self.seconds
        self.engine.module.train()
        every = self.cfg.checkpoint_every
        while self.step < self.steps:
            s = self.train_step(self._batch(it))
            self.history.append(s)
            self.seconds = start_seconds + time.perf_counter() - t0
            if self.ckpt_dir is not None and (s.step == self.steps or (every and s.step % every == 0)):
                self.save_checkpoint()
            if s.step % self.cfg.log_every == 0 or s.step == self.steps or s.step == start_step + 1:
                done = s.step - start_step
                rate = done * self.batch_size * self.seq_len / max(self.seconds - start_seconds, 1e-9)
                eta = (self.steps - s.step) * self.batch_size * self.seq_len / max(rate, 1e-9)
                m = mfu(self.flops_per_token, rate, self.peak_flops)
                log.info("step %d/%d loss %.4f aux %.4f lr %.3g grad %.3f | %.0f tok/s%s ETA %s",
                         s.step, self.steps, s.loss, s.aux_loss, s.lr, s.grad_norm, rate,
                         f" MFU {m:.1%}" if m is not None else "", _fmt_seconds(eta))
        return self.history

    def client_state(self) -> dict[str, Any]:
        """The loop's part of a checkpoint (the engine saves model and optimizer itself)."""
        return {"step": self.step, "seconds": self.seconds, "loader": self.loader.state_dict(),
                "history": [h.row() for h in self.history], "load_sum": self.load_sum,
                "rng": checkpoint.rng_state()}

    def load_client_state(self, state: dict[str, Any]) -> None:
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self.loader.load_state_dict(state["loader"])
        self.history = [StepStats(**h) for h in state["history"]]
        self.load_sum = state["load_sum"]
        checkpoint.set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        assert self.ckpt_dir is not None
        self.last_checkpoint = checkpoint.save(self.ckpt_dir, self.engine, self.step, self.client_state())

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in ckpt_dir, if there is one."""
        target = checkpoint.latest(self.ckpt_dir, self.engine.name) if self.ckpt_dir is not None else None
        if target is None:
            return False
        client = checkpoint.load(target, self.engine)
        if client is None:  # unreadable: checkpoint.load warned; start fresh
            return False
        self.load_client_state(client)
        self.last_checkpoint = target
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), **self.client_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.load_client_state(state)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -------------------------------------------------------------------------------------- metrics
def summarize(history: list[StepStats], trainer: Trainer) -> dict[str, Any]:
    tail = history[-max(1, len(history) // 10):]
    tokens = trainer.step * trainer.batch_size * trainer.seq_len
    seconds = trainer.seconds
    rate = tokens / seconds if seconds > 0 else None
    run_mfu = mfu(trainer.flops_per_token, rate, trainer.peak_flops) if rate else None
    return {
        "steps": trainer.step,
        "tokens": tokens,
        "final_train_loss": sum(h.loss for h in tail) / len(tail),
        "final_train_loss_steps": len(tail),
        "first_train_loss": history[0].loss if history else None,
        "final_aux_loss": sum(h.aux_loss for h in tail) / len(tail),
        "final_z_loss": sum(h.z_loss for h in tail) / len(tail),
        "wall_seconds": round(seconds, 3),
        "tokens_per_second": round(rate, 1) if rate else None,
        "mfu": round(run_mfu, 5) if run_mfu is not None else None,
        "flops_per_token": trainer.flops_per_token,
        "expert_load": load_stats(trainer.load_sum, trainer.step),
    }


# ---------------------------------------------------------------------------------------- stage
def check_plan(plan: dict[str, Any], plan_path: Path | str, cfg: TrainConfig) -> None:
    """The plan fields the loop relies on, and that it matches the current train section."""
    for key in ("arch", "steps", "batch_size", "tokens", "tokens_per_step", "flops_per_token", "compute_convention"):
        if key not in plan:
            raise TrainError(f"{plan_path}: missing key {key!r} (re-run the plan stage)")
    if plan["batch_size"] != cfg.batch_size:
        raise TrainError(f"{plan_path}: batch_size={plan['batch_size']} but train.batch_size="
                         f"{cfg.batch_size} (the plan is stale: re-run plan)")
    if plan["tokens"] != plan["steps"] * plan["batch_size"] * plan["arch"]["seq_len"]:
        raise TrainError(f"{plan_path}: tokens={plan['tokens']} != steps * batch_size * seq_len")


def attach_step_graphs(trainer: Trainer) -> str | None:
    """Give the torch engine its StepGraphs (train.cuda_graph); the reason it cannot, logged, else None."""
    from moe_study.train.cudagraph import StepGraphs, graph_problem

    engine = trainer.engine
    why = ("train.cuda_graph needs the torch engine" if not hasattr(engine, "graphs")
           else graph_problem(engine.device, trainer.accumulation, trainer.world, trainer.fault))
    if why is not None:
        log.warning("train.cuda_graph off: %s", why)
        return why
    engine.graphs = StepGraphs(engine, trainer.micro, trainer.seq_len)
    return None


def train(
    model: LM,
    loader: BatchLoader,
    cfg: TrainConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    flops_per_token: float | None = None,
    ckpt_dir: Path | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """Train `model` for `steps` steps on `loader` (resuming from ckpt_dir if it holds a checkpoint); cfg's
    "auto" speed choices are made here (moe_study/train/speed.py; the model was built with its expert backend)."""
    torch.set_num_threads(gpu_slots.cpu_threads(cfg.threads))  # a packed GPU job: its share of the cores
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    init_distributed(device)
    try:
        cfg, speed_record = speed_config(cfg, device, batch_size)
        engine = make_engine(model, cfg, lr, device, batch_size)
    except EngineError as err:
        raise TrainError(str(err)) from None
    peak, peak_source = device_peak_flops(device, cfg.peak_tflops)
    trainer = Trainer(engine=engine, loader=loader, steps=steps, batch_size=batch_size,
                      seq_len=model.arch.seq_len, vocab_size=model.vocab_size, lr=lr, cfg=cfg,
                      flops_per_token=flops_per_token, peak_flops=peak, ckpt_dir=ckpt_dir, fault=fault_from_env())
    graph_why = attach_step_graphs(trainer) if cfg.cuda_graph else None
    resumed_from = trainer.step if trainer.resume() else None
    history = trainer.run()
    metrics = summarize(history, trainer)
    metrics["device"] = str(device.type)
    metrics["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    metrics["peak_flops"] = peak
    metrics["peak_flops_source"] = peak_source
    metrics["engine"] = engine.name
    fallback = engine_choice(cfg, device)[1]
    if fallback is not None:  # only then: train.json of every other run stays byte-identical
        metrics["engine_fallback"] = fallback
    metrics["dtype"] = cfg.dtype
    metrics["processes"] = trainer.world
    metrics["gradient_accumulation"] = trainer.accumulation
    metrics["micro_batch_size"] = trainer.micro
    metrics["compile"] = cfg.compile
    if speed_record is not None:  # GPU runs only: CPU runs' train.json stays byte-identical
        metrics["speed_defaults"] = speed_record
    if cfg.cuda_graph:  # only then: CPU runs' train.json stays byte-identical
        graphs = getattr(engine, "graphs", None)
        metrics["cuda_graph"] = graphs is not None and graphs.captured
        metrics["cuda_graph_fallback"] = graph_why or (graphs.disabled if graphs is not None else None)
    metrics["resumed_from_step"] = resumed_from
    metrics["threads"] = torch.get_num_threads()
    metrics["expert_backends"] = engine.module.expert_backends() or None
    if getattr(engine, "config", None) is not None:
        metrics["deepspeed_config"] = engine.config
    return trainer, metrics


def hf_config(arch: dict[str, Any], vocab_size: int, eos_id: int) -> dict[str, Any]:
    """Hugging Face-style keys beside our own (tools that read config.json find the usual names)."""
    moe = arch["kind"] == "moe"
    return {"model_type": "moe_equal_resources_lm", "architectures": ["LM"], "hidden_size": arch["d_model"],
            "num_hidden_layers": arch["n_layers"], "num_attention_heads": arch["n_heads"],
            "max_position_embeddings": arch["seq_len"], "intermediate_size": arch["ffn_hidden"],
            "num_local_experts": arch["experts"] if moe else None,
            "num_experts_per_tok": arch["top_k"] if moe else None,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": arch.get("tie_embeddings", True),
            "eos_token_id": eos_id, "torch_dtype": "float32"}


def run_dir(run: str, work: Path = WORK) -> Path:
    return work / "runs" / run


def _build(p: Params, plan: dict[str, Any], vocab_size: int, expert_backend: str) -> LM:
    """The planned model; passes params.yaml `router:` when the schema has one (issue 5)."""
    router = getattr(p, "router", None)
    extra = {"router": router} if router is not None else {}
    return build_model(plan["arch"], vocab_size, expert_backend, **extra)


def run_train(p: Params, run: str, work: Path = WORK, loader: BatchLoader | None = None) -> dict[str, Any]:
    """The stage: read plan/replay/tokens manifest, train (resuming), write the outputs (rank 0)."""
    from moe_study.data.shards import ReplayLoader, tokens_meta

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
    # the "auto" speed choices as this process makes them (speed.py): the model's expert backend, and what
    # provenance and the checkpoint key hash, so a GPU run never resumes from a CPU run's checkpoint
    try:
        ran = speed_config(cfg, resolve_device(cfg.device), plan["batch_size"])[0]
    except EngineError as err:
        raise TrainError(str(err)) from None
    torch.manual_seed(seed)  # the init depends on the seed only
    model = _build(p, plan, tm["vocab_size"], ran.expert_backend)
    total, active = count_nonvocab_params(model)
    if (total, active) != (plan["nonvocab_params"], plan["nonvocab_active"]):
        raise TrainError(f"model has N={total}, N_active={active} but {plan_path} says "
                         f"N={plan['nonvocab_params']}, N_active={plan['nonvocab_active']}")
    inputs = {"plan": sha256_file(plan_path), "replay": sha256_file(replay_path), "tokens": tm["sha256"]}
    section = {"train": ran.model_dump(), f"runs.{run}": p.run(run).model_dump(), "lr": lr, "seed": seed}
    router = getattr(p, "router", None)
    if router is not None:  # part of provenance and of the checkpoint key: another router never resumes
        section["router"] = router.model_dump()
    prov = provenance("train", inputs, section)
    run_section = {k: v for k, v in section.items() if k != "train"}  # train goes in filtered (NOT_IN_KEY)
    key = checkpoint.checkpoint_key(inputs, ran.model_dump(), run_section, prov["code_sha256"])
    ckpt_dir = checkpoint.checkpoint_dir(run, key, work)
    checkpoint.prune_stale_keys(ckpt_dir)
    rank = dist_env()[0]
    if rank != 0:
        log.setLevel(logging.WARNING)
    log.info("%s: %s N=%d N_active=%d, %d steps x %d tokens, lr %.3g seed %d; checkpoints in %s", run,
             plan["arch"]["kind"], total, active, plan["steps"], plan["tokens_per_step"], lr, seed, ckpt_dir)
    loader = loader if loader is not None else ReplayLoader(replay_path, plan["batch_size"])
    trainer, metrics = train(model, loader, cfg, steps=plan["steps"], batch_size=plan["batch_size"], lr=lr,
                             seed=seed, flops_per_token=float(plan["flops_per_token"]),
                             ckpt_dir=ckpt_dir)
    if loader.tokens_served != plan["tokens"] or metrics["tokens"] != plan["tokens"]:
        raise TrainError(f"consumed {loader.tokens_served} tokens (loop counted {metrics['tokens']}) but the "
                         f"plan budgets {plan['tokens']}: the compute budget was not met")
    if rank != 0:
        return metrics
    config = {"arch": plan["arch"], "vocab_size": tm["vocab_size"], "eos_id": tm["eos_id"],
              "nonvocab_params": total, "nonvocab_active": active, "run": run, "provenance": prov,
              **hf_config(plan["arch"], tm["vocab_size"], tm["eos_id"]),
              **({"router": router.model_dump()} if router is not None else {})}
    engine = trainer.engine
    with atomic_path(rdir / "model") as tmp:
        save_model(engine.module, tmp, config)
        write_file_list(tmp)  # sha256 of the weights and config, checked by load_model
    kind = plan["arch"]["kind"]
    write_steps_parquet(rdir / "steps.parquet", trainer.history, kind)
    result = {"run": run, "kind": kind, "nonvocab_params": total, "nonvocab_active": active,
              "tokens_seen": loader.tokens_served, "plan_tokens": plan["tokens"], "lr": lr, "seed": seed,
              **metrics, "flops_convention": plan["compute_convention"],
              # F x tokens read: in the budget's convention (what the study equalises) and exactly (every matmul)
              "train_flops": plan["flops_per_token"] * loader.tokens_served,
              "train_flops_exact": exact_train_flops(plan, loader.tokens_served),
              "checkpoint_dir": str(ckpt_dir),
              "provenance": prov}
    result["audit"] = audit_run(plan, engine.module, loader.tokens_served)  # plan vs module, loader, flop counter
    claim = gpu_slots.current()
    if claim is not None:  # only then (several runs on one GPU): where it ran; not in the model's config.json
        result["gpu_claim"] = claim.record()
    keys = ("final_train_loss", "tokens_per_second", "mfu", "final_aux_loss", "wall_seconds")
    write_dvclive(rdir / "dvclive", trainer.history, kind, {k: result[k] for k in keys})
    write_json(rdir / "train.json", result)
    log.info("%s: final train loss %.4f, %d tokens in %.1fs (%.0f tok/s)", run, result["final_train_loss"],
             result["tokens_seen"], result["wall_seconds"], result["tokens_per_second"] or 0)
    return result
