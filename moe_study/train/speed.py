"""What train's "auto" speed choices mean: the fastest configuration measured, in one table.

The study's numbers must not depend on these choices (each is a speed choice, never a maths choice:
the same model, data and recipe, results within bf16 rounding), so they are picked for speed, from
measurements, per device kind and process count:

- one process on a CUDA GPU: the torch engine, torch_grouped expert GEMMs, torch.compile (torch's
  default mode) and the whole step as two CUDA graphs (moe_study/train/cudagraph.py). Measured at
  the study's shapes (20M family, seq 1024, batch 64, bf16) on an H200: MoE r_a 0.1 63.2 -> 20.5
  ms/step, r_a 0.2 62.1 -> 27.0, r_a 0.44 55.7 -> 33.9, dense 33.4 -> 31.9 against compile without
  graphs; the fused expert block was no faster once graphed (results/perf/study_step_h200.md). The
  torch engine also beat DeepSpeed ZeRO-1 on one GPU by 0-5% (results/perf/train_mfu_h100.md), and
  CUDA graphs need it.
- several CUDA processes: today's choices (DeepSpeed, no compile, no graph: the graphs do not
  capture the gradient all-reduce, and nothing else was measured there).
- CPU: today's choices exactly (torch engine, reference experts, no compile, no graph), so CPU runs
  stay byte-identical.

An explicit value in params.yaml always wins; an "auto" the row cannot apply (DeepSpeed asked for,
gradient accumulation, a compile mode that graphs itself, the reference experts) falls back to off
with its reason. `resolve` is a pure function of the config, the device kind, the process count and
the accumulation; its config (every compile / cuda_graph "auto" replaced) is what the engines run,
what train.json's provenance and the checkpoint key hash (so a GPU run never resumes a CPU run's
checkpoint), and its record is train.json's `speed_defaults` (CUDA runs only: CPU train.json stays
byte-identical).
"""

from __future__ import annotations

from typing import Any

from moe_study.config.schema import TrainConfig

SOURCE = "results/perf/study_step_h200.md"
# the fastest measured configuration of one process on one CUDA GPU (see the module docstring)
CUDA_ONE_PROCESS: dict[str, Any] = {"engine": "torch", "expert_backend": "torch_grouped", "compile": True,
                                    "cuda_graph": True}
SELF_GRAPHING = ("reduce-overhead", "max-autotune")  # compile modes that capture CUDA graphs themselves


def resolve(cfg: TrainConfig, device_type: str, world: int, accumulation: int
            ) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(cfg with every compile / cuda_graph "auto" replaced, and on one CUDA process engine and
    expert_backend too; the record for train.json, None off CUDA). Idempotent: resolving the result
    again changes nothing."""
    requested = {f: getattr(cfg, f) for f in ("engine", "expert_backend", "compile", "cuda_graph")}
    if device_type != "cuda" or world != 1:  # today's meaning of every "auto": compile and graphs off
        off: dict[str, Any] = {f: False for f in ("compile", "cuda_graph") if getattr(cfg, f) == "auto"}
        if "compile" in off:
            off["compile_mode"] = None
        out = cfg.model_copy(update=off)
        if device_type != "cuda":
            return out, None
        why = f"{world} processes: the table has no row for several processes"
        return out, {**_values(out), "source": None, "requested": requested,
                     "auto_off": dict.fromkeys((f for f in off if f != "compile_mode"), why)}
    update: dict[str, Any] = {}
    auto_off: dict[str, str] = {}
    for field in ("engine", "expert_backend"):
        if getattr(cfg, field) == "auto":
            update[field] = CUDA_ONE_PROCESS[field]
    engine = update.get("engine", cfg.engine)
    backend = update.get("expert_backend", cfg.expert_backend)
    if cfg.compile == "auto":
        update["compile"] = engine == "torch"
        if engine != "torch":
            auto_off["compile"] = f"train.engine={engine}: compile was measured with the torch engine only"
    if cfg.cuda_graph == "auto":
        why = graph_off(engine, backend, accumulation, cfg.compile_mode if update.get("compile", cfg.compile)
                        is True else None)
        update["cuda_graph"] = why is None
        if why is not None:
            auto_off["cuda_graph"] = why
    if update.get("compile") is False:
        update["compile_mode"] = None  # a mode given for an "auto" compile that stays off
    out = cfg.model_copy(update=update)
    return out, {**_values(out), "source": SOURCE, "requested": requested, "auto_off": auto_off}


def graph_off(engine: str, backend: str, accumulation: int, compile_mode: str | None) -> str | None:
    """Why an "auto" cuda_graph stays off on one CUDA process (None: on). Explicit `cuda_graph: true`
    is checked at run time instead (moe_study/train/cudagraph.py's graph_problem), and says why there."""
    if engine != "torch":
        return f"train.engine={engine}: the step graphs need the torch engine"
    if accumulation != 1:
        return f"gradient accumulation {accumulation}: the step graphs need one micro-batch per step"
    if backend == "reference":
        return "train.expert_backend=reference reads its group sizes on the host (a sync per call)"
    if compile_mode in SELF_GRAPHING:
        return f"train.compile_mode={compile_mode} already captures CUDA graphs"
    return None


def _values(cfg: TrainConfig) -> dict[str, Any]:
    compile_ = (cfg.compile_mode or "default") if cfg.compile else False
    return {"engine": cfg.engine, "expert_backend": cfg.expert_backend, "compile": compile_,
            "cuda_graph": cfg.cuda_graph}
