"""What a training run records: per-step rows, MFU, expert-load statistics, Parquet and dvclive.

- `StepStats`: one row per optimizer step (loss, lr, grad norm, tokens, tokens/s, MFU, and for MoE
  the aux/z losses and the step's expert load: max/mean over experts, worst layer, and the
  normalised entropy, mean over layers; and per layer, as list columns: max/mean, entropy and the
  fraction of routed slots per expert). The same rows make work/runs/<run>/steps.parquet (every
  column, for DuckDB; its schema is STEP_COLUMNS + LAYER_COLUMNS) and the dvclive curves.
- MFU = (model FLOPs per token from the planner, moe_study.accounting) * tokens/s / device peak.
  Peaks are dense bf16 tensor-core figures of the datasheets (fp32 runs use the same peak, so
  their MFU is honest about what was left on the table). On CPU there is no trustworthy peak, so
  MFU is null unless train.peak_tflops gives one.
- dvclive writes work/runs/<run>/dvclive/ (metrics.json + plots/metrics/*.tsv) without touching
  dvc.yaml (which is generated from the registry, where those files are declared), so
  `dvc exp show` and `dvc plots show` read them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:  # torch is imported where it is used, so the collect stage can read STEP_COLUMNS without it
    import torch

# Dense bf16 tensor-core peaks, TFLOP/s (datasheets; substring of torch.cuda.get_device_name).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

# The schema of steps.parquet, defined once: the trainer writes these columns and the collect stage
# (moe_study.report.collect) reads them into the study database's `steps` table. One row per step.
STEP_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("step", pa.int64()), ("tokens", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()),
    ("grad_norm", pa.float64()), ("tokens_per_s", pa.float64()), ("mfu", pa.float64()),
    ("aux_loss", pa.float64()), ("z_loss", pa.float64()),  # null for dense runs, as the load columns
    ("load_max_over_mean", pa.float64()), ("load_entropy", pa.float64()),
)
# MoE only, per layer (lists): max/mean load, normalised entropy, fraction of routed slots per expert
LAYER_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("layer_load_max_over_mean", pa.list_(pa.float64())), ("layer_load_entropy", pa.list_(pa.float64())),
    ("layer_expert_fraction", pa.list_(pa.list_(pa.float64()))),
)


@dataclass
class StepStats:
    step: int
    loss: float  # cross-entropy (nats per token), without the auxiliary losses
    lr: float
    tokens: int  # cumulative target tokens after this step
    aux_loss: float
    z_loss: float
    grad_norm: float  # pre-clip global norm
    seconds: float = 0.0  # wall time of this step
    tokens_per_s: float | None = None
    mfu: float | None = None
    load_max_over_mean: float | None = None  # MoE: worst layer's max expert load / mean load
    load_entropy: float | None = None  # MoE: mean over layers of entropy(load) / ln(E), 1 = uniform
    load: Any = None  # MoE: (layers, E) float32 array, fraction of this step's routed slots per expert
    layer_load_max_over_mean: list[float] | None = None  # MoE: per layer, max / mean of `load`
    layer_load_entropy: list[float] | None = None  # MoE: per layer, entropy(load) / ln(E)

    def row(self) -> dict[str, Any]:
        return asdict(self)


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where it came from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type != "cuda":
        return None, "no peak for CPU (set train.peak_tflops to report MFU)"
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16 (datasheet)"
    return None, f"{name}: not in moe_study.train.trainlog.PEAK_TFLOPS"


def mfu(flops_per_token: float | None, tokens_per_s: float, peak: float | None) -> float | None:
    if not flops_per_token or not peak:
        return None
    return flops_per_token * tokens_per_s / peak


def layer_load_stats(load: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer of a (layers, E) load: max/mean over experts, and entropy / ln(E) (1 = uniform)."""
    load = load.double()
    E = load.shape[1]
    ratio = load.max(dim=1).values / load.mean(dim=1)
    ent = -(load * load.clamp_min(1e-12).log()).sum(dim=1) / math.log(E)
    return [float(v) for v in ratio], [float(v) for v in ent]


def step_load_fields(load: torch.Tensor | None) -> dict[str, Any]:
    """The MoE fields of a StepStats from one step's (layers, E) load, computed once per step.

    Everything derives from the float32 `load` the row keeps (steps.parquet's layer_expert_fraction):
    the per-layer max/mean and entropy (steps.parquet's list columns, dvclive's per-layer curves) and
    the step's summary, max over layers and mean over layers of them. The writers read these fields
    instead of recomputing them, and the file is self-consistent: the stats follow from its fractions.
    """
    if load is None:
        return {}
    import torch

    frac = load.float().numpy()
    ratio, ent = layer_load_stats(torch.from_numpy(frac))
    return {"load": frac, "load_max_over_mean": max(ratio), "load_entropy": sum(ent) / len(ent),
            "layer_load_max_over_mean": ratio, "layer_load_entropy": ent}


def load_stats(load_sum: torch.Tensor | None, steps: int) -> dict[str, Any] | None:
    """Fraction of routed slots per expert (averaged over steps) and how far from uniform it is."""
    if load_sum is None:
        return None
    mean = load_sum / max(1, steps)  # (layers, E), each row sums to 1
    E = mean.shape[1]
    _, ent = layer_load_stats(mean)
    return {
        "fraction_per_expert": [[round(float(v), 6) for v in row] for row in mean],
        "max_over_uniform": [round(float(row.max() * E), 6) for row in mean],
        "min_over_uniform": [round(float(row.min() * E), 6) for row in mean],
        "cv": [round(float(row.std(unbiased=False) / row.mean()), 6) for row in mean],
        "entropy": [round(e, 6) for e in ent],
    }


def steps_table(history: list[StepStats], kind: str) -> pa.Table:
    """The steps.parquet table: STEP_COLUMNS then LAYER_COLUMNS, the MoE-only ones null for dense runs."""
    moe = kind == "moe"
    cols: dict[str, list[Any]] = {c: [] for c, _ in STEP_COLUMNS}
    for h in history:
        r = h.row()
        for c in cols:
            cols[c].append(None if c in ("aux_loss", "z_loss") and not moe else r[c])
    for c, _ in LAYER_COLUMNS:
        cols[c] = []
    for h in history:
        moe_row = h.load is not None
        cols["layer_load_max_over_mean"].append(h.layer_load_max_over_mean if moe_row else None)
        cols["layer_load_entropy"].append(h.layer_load_entropy if moe_row else None)
        cols["layer_expert_fraction"].append(h.load.tolist() if moe_row else None)
    return pa.table({c: pa.array(cols[c], t) for c, t in (*STEP_COLUMNS, *LAYER_COLUMNS)})


def write_steps_parquet(path: Path, history: list[StepStats], kind: str) -> None:
    import pyarrow.parquet as pq

    from moe_study.io import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(steps_table(history, kind), tmp)


DVCLIVE_MAX_ROWS = 2000  # longer runs log every k-th step to dvclive (steps.parquet keeps every step)


def write_dvclive(directory: Path, history: list[StepStats], kind: str, summary: dict[str, Any]) -> bool:
    """The run's curves and final values through dvclive, from the whole history at the end.

    Written once from the history (which a checkpoint carries across a kill) rather than streamed,
    so a resumed run never holds the rows of steps it re-trains twice. Returns False if dvclive is
    not installed (the GPU bench machine may lack it).
    """
    try:
        from dvclive import Live
    except ImportError:
        return False
    from moe_study.io import atomic_path

    stride = max(1, math.ceil(len(history) / DVCLIVE_MAX_ROWS))  # dvclive appends row by row (~5 ms per step)
    with atomic_path(directory) as tmp:
        live = Live(str(tmp), resume=False, dvcyaml=None, save_dvc_exp=False, report=None, monitor_system=False)
        for i, s in enumerate(history):
            if (i + 1) % stride and i + 1 != len(history):
                continue
            live.step = s.step
            values = {"loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "tokens": s.tokens,
                      "tokens_per_s": s.tokens_per_s, "mfu": s.mfu}
            if kind == "moe":
                values |= {"aux_loss": s.aux_loss, "z_loss": s.z_loss, "load_max_over_mean": s.load_max_over_mean,
                           "load_entropy": s.load_entropy}
            if kind == "moe" and s.layer_load_max_over_mean is not None and s.layer_load_entropy is not None:
                pairs = zip(s.layer_load_max_over_mean, s.layer_load_entropy, strict=True)
                for layer, (r, e) in enumerate(pairs):
                    values |= {f"layer{layer}/load_max_over_mean": r, f"layer{layer}/load_entropy": e}
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    live.log_metric(f"train/{k}", v)
        for k, v in summary.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                live.summary[k] = v
        live.end()
    return True
