"""Intervals of a difference between two arms (MoE - dense), for the study database and the summary.

Two sources of noise, two intervals (95%, two-sided):
- `paired_bootstrap`: every run scores the same held-out documents (evaluate@run writes per-document
  nats, tokens and bytes), so a difference is resampled *pairing* documents: the same resampled
  documents for both arms, Δ = Σ(nats_A - nats_B) / Σ tokens (loss) and / ln 2 / Σ bytes (bits per byte),
  percentile interval. An arm of several runs enters as its per-document mean. It measures the
  document sampling only: what one seed per arm allows.
- `welch`: with >= 2 seeds in both arms, the Welch t-interval over the runs' figures (unequal
  variances, Welch-Satterthwaite degrees of freedom): seed noise, which includes the data order.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

CHUNK = 64  # resamples per vectorised block


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], tokens: np.ndarray, n_bytes: np.ndarray,
                     resamples: int, seed: int) -> dict[str, float | None]:
    """Δloss and Δbpb of arm a minus arm b (per-document nats of each arm's runs, same documents in
    the same order) with 95% percentile intervals over `resamples` document resamples."""
    diff = np.mean(np.stack(a), axis=0) - np.mean(np.stack(b), axis=0)
    tokens, n_bytes = np.asarray(tokens, dtype=np.float64), np.asarray(n_bytes, dtype=np.float64)
    out: dict[str, float | None] = {"d_val_loss": float(diff.sum() / tokens.sum()),
                                    "d_val_bpb": float(diff.sum() / math.log(2) / n_bytes.sum())}
    if resamples <= 0 or len(diff) == 0:
        return out | {"d_val_loss_lo": None, "d_val_loss_hi": None, "d_val_bpb_lo": None, "d_val_bpb_hi": None}
    rng = np.random.default_rng(seed)
    n = len(diff)
    dl, db = np.empty(resamples), np.empty(resamples)
    for s in range(0, resamples, CHUNK):
        k = min(CHUNK, resamples - s)
        idx = rng.integers(0, n, size=(k, n))
        d = diff[idx].sum(axis=1)
        dl[s:s + k] = d / tokens[idx].sum(axis=1)
        db[s:s + k] = d / math.log(2) / n_bytes[idx].sum(axis=1)
    return out | {"d_val_loss_lo": float(np.percentile(dl, 2.5)), "d_val_loss_hi": float(np.percentile(dl, 97.5)),
                  "d_val_bpb_lo": float(np.percentile(db, 2.5)), "d_val_bpb_hi": float(np.percentile(db, 97.5))}


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi): the Welch 95% t-interval; a and b need >= 2 values each."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch needs >= 2 values per arm, got {len(a)} and {len(b)}")
    d = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df)) * se
    return d, d - half, d + half


def excludes_zero(lo: float | None, hi: float | None) -> bool | None:
    """True when the interval lies on one side of 0 (null without an interval)."""
    if lo is None or hi is None:
        return None
    return bool(lo > 0 or hi < 0)
