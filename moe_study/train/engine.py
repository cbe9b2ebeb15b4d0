"""How a training step is applied: the LR schedule, the engines and the generated DeepSpeed config.

Two engines with one interface (`forward`, `backward`, `step`, checkpoint `save`/`load`), so the
loop in stages/train.py is the same on a laptop CPU, one GPU and several GPUs:
- "deepspeed": `deepspeed.initialize` with a config generated from params.yaml `train:` (ZeRO
  stage 1 or 2, bf16, gradient clipping, AdamW, micro/global batch and gradient accumulation).
  On a CPU it runs with DS_ACCELERATOR=cpu, fp32 and torch's AdamW. Checkpoints are DeepSpeed's own
  (every rank writes its optimizer partition).
- "torch": a plain loop (AdamW, clip_grad_norm_, autocast for bf16; several processes average the
  gradients with one all-reduce each). The default on CPU, where it is what CI runs, and on one GPU,
  where it is the faster (and the only one the step's CUDA graphs run on).
"auto" picks torch on one CUDA process, deepspeed on several, torch on CPU (moe_study/train/speed.py,
from measurements, with the other "auto" speed choices); train.json names the engine that ran.

The LR schedule is applied by the loop on both engines (linear warmup, then cosine to
min_lr_ratio*lr, or warmup-stable-decay), so both follow the same curve and a resume restores it
from the step alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import socket
from pathlib import Path
from typing import Any

import torch

from moe_study.config.schema import TrainConfig, batch_split
from moe_study.model.lm import LM
from moe_study.train import speed
from moe_study.train.launch import dist_env

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8

log = logging.getLogger("stages.train")


class EngineError(ValueError):
    """A train configuration the chosen engine cannot run (names the field)."""


# -------------------------------------------------------------------------------------- schedule
def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    return int(round(cfg.warmup_fraction * steps)) if cfg.warmup_fraction is not None else cfg.warmup_steps


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate of optimizer step `step` (0-based).

    cosine: linear warmup, then cosine from lr to min_ratio*lr at the last step.
    wsd: linear warmup, constant lr, then linear decay to min_ratio*lr over the last decay_fraction
    of the steps (warmup-stable-decay: the stable phase can be extended without re-running).
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    floor = min_ratio * lr
    if schedule == "wsd":
        decay = max(1, int(round(decay_fraction * steps)))
        start = max(warmup, steps - decay)
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / max(1, steps - start))
        return lr - progress * (lr - floor)
    decay_steps = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - floor)


def schedule_lr(cfg: TrainConfig, step: int, steps: int, lr: float) -> float:
    return lr_at(step, steps, lr, warmup_steps(cfg, steps), cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (dim >= 2: linear, embedding, expert tensors), not norm weights."""
    decay = [p for _, p in sorted(model.named_parameters()) if p.dim() >= 2]
    no_decay = [p for _, p in sorted(model.named_parameters()) if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- device, processes
def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise EngineError("train.device=cuda but no CUDA device is visible (use auto or cpu)")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        local, visible = dist_env()[2], torch.cuda.device_count()
        if local >= visible:  # a launcher started more processes per node than there are GPUs
            raise EngineError(f"process LOCAL_RANK={local} has no GPU: {visible} CUDA device(s) are visible "
                              f"(train.gpus, or the launcher's processes per node, is too large)")
        return torch.device("cuda", local)
    return torch.device(requested)


DEEPSPEED_HINT = "pip install deepspeed (the version in requirements.txt)"


def deepspeed_missing() -> str | None:
    """Why DeepSpeed cannot be imported (None when it can): an optional dependency on a GPU box."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return f"DeepSpeed is not installed ({DEEPSPEED_HINT})"
    return None


def speed_config(cfg: TrainConfig, device: torch.device, batch_size: int | None = None
                 ) -> tuple[TrainConfig, dict[str, Any] | None]:
    """speed.resolve for this process (the launched world size and the accumulation of the global batch
    `batch_size`, cfg's when None): cfg with its "auto" speed choices made, and train.json's record."""
    world = dist_env()[1]
    try:
        accumulation = batch_split(batch_size or cfg.batch_size, world, cfg.micro_batch_size)[1]
    except ValueError as err:
        raise EngineError(f"{err} ({world} processes launched)") from None
    return speed.resolve(cfg, device.type, world, accumulation)


def engine_choice(cfg: TrainConfig, device: torch.device) -> tuple[str, str | None]:
    """(engine, why it is not the one asked for), of a speed_config'd cfg: `auto` is then left only on
    CPU (torch) and on several CUDA processes (DeepSpeed); without DeepSpeed it
    falls back to the torch engine (same numbers on one process, see test_engines) and says why, in
    the log and in train.json (`engine_fallback`), instead of dying with a ModuleNotFoundError."""
    if cfg.engine != "auto":
        return cfg.engine, None
    if device.type != "cuda":
        return "torch", None
    missing = deepspeed_missing()
    if missing is not None:
        log.warning("train.engine=auto: %s; training with the torch engine instead", missing)
        return "torch", f"train.engine=auto chose torch on CUDA: {missing}"
    return "deepspeed", None


def resolve_engine(cfg: TrainConfig, device: torch.device) -> str:
    return engine_choice(cfg, device)[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: torch.device) -> None:
    """Join the process group of a multi-process launch (NCCL on GPUs, gloo on CPU); no-op for one process."""
    import torch.distributed as dist

    if dist_env()[1] == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)


def autocast_context(device: torch.device, dtype: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast (cache=False: no weight-cast cache, as inside a captured CUDA graph), else nothing."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def compile_blocks(model: LM, mode: str | None = None) -> None:
    """torch.compile each transformer block in place (nn.Module.compile keeps the state_dict keys), and the
    training head (final norm + LM head + cross-entropy, so its float32 logits are never materialised)."""
    for block in model.blocks:
        block.compile(mode=mode)
    model.compile_head(mode)


# ------------------------------------------------------------------------------ DeepSpeed config
def deepspeed_config(cfg: TrainConfig, lr: float, device_type: str, world: int) -> dict[str, Any]:
    """The DeepSpeed config of params.yaml `train:` (the LR schedule is applied by the loop, see above).

    Choices that are not numbers to tune:
    - optimizer: torch's AdamW (no JIT build of DeepSpeed's FusedAdam), with `fused: true` on CUDA (one
      kernel over all tensors; DeepSpeed passes extra params on to torch.optim.AdamW when torch_adam is
      set; without it torch picks its multi-kernel foreach loop). On CPU torch's reference loop.
    - bf16 `check_grad_overflow: false`: bf16 has float32's range and no loss scale, so DeepSpeed's
      pre-step overflow check (a pass over every gradient, an all-reduce and a host sync each step)
      only duplicates the loop's own guard: the loop stops on a non-finite or too large pre-clip norm
      (DeepSpeedEngine.step reports DeepSpeed's invalid-norm sentinel, a negative norm, as NaN).
    - ZeRO-2 overlaps the gradient reduction with the backward (overlap_comm) only with several
      processes: one process has nothing to communicate, the side stream only adds synchronisation.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 2:
        zero |= {"contiguous_gradients": True, "overlap_comm": device_type == "cuda" and world > 1,
                 "reduce_scatter": True, "allgather_partitions": True}
    adam: dict[str, Any] = {"lr": lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": cfg.weight_decay,
                            "torch_adam": True}
    if device_type == "cuda":
        adam["fused"] = True
    bf16: dict[str, Any] = {"enabled": cfg.dtype == "bf16"}
    if cfg.dtype == "bf16":
        bf16["check_grad_overflow"] = False
    try:
        micro, accumulation = batch_split(cfg.batch_size, world, cfg.micro_batch_size)  # the loop's split too
    except ValueError as err:
        raise EngineError(str(err)) from None
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": bf16,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def ds_grad_norm(norm: Any) -> float:
    """DeepSpeed's pre-clip gradient norm as a float; None or its invalid-norm sentinel (-1) become NaN
    (so the loop's non-finite check stops the run instead of reading -1 as a small norm)."""
    n = float(norm) if norm is not None else float("nan")
    return n if n >= 0 else float("nan")


# --------------------------------------------------------------------------------------- engines
class _InMemoryState:
    """Model + optimizer state in memory (what the resume tests compare); both engines expose
    `module` and `optimizer`."""

    module: Any
    optimizer: Any

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class TorchEngine(_InMemoryState):
    """Plain PyTorch: AdamW, clip_grad_norm_, autocast for bf16; gradients all-reduced across processes."""

    name = "torch"

    def __init__(self, model: LM, cfg: TrainConfig, lr: float, device: torch.device) -> None:
        self.module = model.to(device)
        self.device = device
        self.cfg = cfg
        self.world = dist_env()[1]
        cuda = device.type == "cuda"  # one fused kernel on GPUs; the reference loop on CPU (bit-stable)
        self.graphs: Any = None  # moe_study.train.cudagraph.StepGraphs, set by the loop (train.cuda_graph)
        if cuda and cfg.cuda_graph:  # capturable: step count and learning rate live on the device
            self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay),
                                               lr=torch.tensor(lr, dtype=torch.float32, device=device),
                                               betas=ADAM_BETAS, eps=ADAM_EPS, fused=True, capturable=True)
        else:
            self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=ADAM_BETAS,
                                               eps=ADAM_EPS, fused=cuda or None)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, cache: bool = True) -> Any:
        with autocast_context(self.device, self.cfg.dtype, cache):
            return self.module(x, targets)

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        (loss / accumulation).backward()

    def grad_norm(self) -> torch.Tensor:
        """All-reduce (average) the gradients over processes, then the global pre-clip norm, a 0-d tensor on
        the device: the loop copies it to the host with the step's losses (one sync) and the clip reuses it."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.world > 1:
            import torch.distributed as dist

            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in params]),
                            strict=True):
                p.grad.copy_(g)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def step(self, lr: float, norm: torch.Tensor) -> None:
        """Clip with the pre-clip norm of grad_norm() (no second pass over the gradients), then AdamW."""
        for g in self.optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):  # capturable AdamW (train.cuda_graph): set in place
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        if self.graphs is not None:  # clip + AdamW as one CUDA graph (gradients stay allocated)
            self.graphs.optimizer_step(lambda: self._clip_step(norm))
            return
        self._clip_step(norm)
        self.optimizer.zero_grad(set_to_none=True)

    def _clip_step(self, norm: torch.Tensor) -> None:
        torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), self.cfg.grad_clip, norm)
        self.optimizer.step()

    def save(self, directory: Path, client: dict[str, Any]) -> None:
        from moe_study.train.checkpoint import to_safe

        if dist_env()[0] == 0:
            torch.save({**self.state_dict(), "client": to_safe(client)}, directory / "torch_state.pt")

    def load(self, directory: Path) -> dict[str, Any]:
        """weights_only=True: tensors and plain containers, never code (see checkpoint.to_safe)."""
        from moe_study.train.checkpoint import CheckpointError, from_safe

        path = directory / "torch_state.pt"
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({str(err)[:200]})") from None
        self.load_state_dict(state)
        return from_safe(state["client"])


class DeepSpeedEngine(_InMemoryState):
    """DeepSpeed ZeRO-1/2 through deepspeed.initialize with the generated config.

    On CPU: DS_ACCELERATOR=cpu, fp32, torch's AdamW and single-process rendezvous variables. The
    first use compiles DeepSpeed's shared-memory comm op with g++ (~40 s, cached in
    ~/.cache/torch_extensions). The pre-clip gradient norm is DeepSpeed's (known after its step).
    """

    name = "deepspeed"

    def __init__(self, model: LM, cfg: TrainConfig, lr: float, device: torch.device) -> None:
        os.environ.setdefault("DS_ACCELERATOR", device.type)
        if device.type == "cpu" and cfg.dtype != "fp32":
            raise EngineError("train.engine=deepspeed on CPU needs train.dtype=fp32")
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        missing = deepspeed_missing()
        if missing is not None:
            raise EngineError(f"train.engine=deepspeed: {missing}; or set train.engine: torch (or auto)")
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        self.device = device
        self.cfg = cfg
        self.config = deepspeed_config(cfg, lr, device.type, dist_env()[1])
        model = model.to(device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=self.config)
        self.module: LM = self.engine.module

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        return self.engine(x, targets)

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # a no-op step that advances DeepSpeed's micro-step counter

    def grad_norm(self) -> None:
        return None  # known only after DeepSpeed's step (see step)

    def step(self, lr: float, norm: torch.Tensor | None) -> float:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        return ds_grad_norm(self.engine.get_global_grad_norm())

    def save(self, directory: Path, client: dict[str, Any]) -> None:
        from moe_study.train.checkpoint import to_safe

        self.engine.save_checkpoint(str(directory), tag="ds", client_state={"client": to_safe(client)},
                                    save_latest=False)

    def load(self, directory: Path) -> dict[str, Any]:
        """Every file is first read weights-only (nothing applied yet, so a refusal is a clean fresh
        start); then DeepSpeed loads through the same weights-only reader instead of its pickle one."""
        from moe_study.train.checkpoint import from_safe

        for path in sorted(directory.rglob("*.pt")):
            ds_weights_only_load(path)
        self.engine.checkpoint_engine.load = ds_weights_only_load
        _, client = self.engine.load_checkpoint(str(directory), tag="ds")
        return from_safe(client["client"])


def ds_safe_globals() -> list[Any]:
    """The DeepSpeed classes its ZeRO optimizer state pickles (plain data: a loss-scaler record, an
    enum, a named tuple); allowed by name, so nothing else in a checkpoint can be called."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def ds_weights_only_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) with ds_safe_globals; a refused or damaged file: CheckpointError."""
    from moe_study.train.checkpoint import CheckpointError

    try:
        with torch.serialization.safe_globals(ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({str(err)[:300]})") from None


def make_engine(model: LM, cfg: TrainConfig, lr: float, device: torch.device, batch_size: int | None = None) -> Any:
    """The engine of `cfg.engine` with its "auto" speed choices made (speed_config; a no-op on a cfg that
    the loop already resolved); batch_size: the global batch when it is not cfg's (tests, benchmarks),
    split like the loop splits it (schema.batch_split)."""
    if batch_size is not None and batch_size != cfg.batch_size:
        cfg = cfg.model_copy(update={"batch_size": batch_size})
    cfg = speed_config(cfg, device)[0]
    if cfg.compile:
        compile_blocks(model, cfg.compile_mode)
    if resolve_engine(cfg, device) == "torch":
        return TorchEngine(model, cfg, lr, device)
    return DeepSpeedEngine(model, cfg, lr, device)
