"""The two interval formulas of the study, in one place: Student-t over seeds, Wilson over items.

Both are scipy.stats (the exact t quantile, the Newcombe form of the Wilson interval): a
hand-written quantile table or formula is one more thing to get subtly wrong. The bootstrap of
the held-out loss stays hand-written (moe_study.evaluation.heldout_loss.bootstrap says why).
"""

from __future__ import annotations

from scipy import stats


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n-1 degrees of freedom (n >= 2 seeds).

    Exact (scipy), so 11-30 seeds do not get the too-narrow normal interval; it replaced a
    3-decimal table (n <= 10) and a Cornish-Fisher expansion, which differ in the 4th decimal.
    """
    return float(stats.t.ppf(0.975, n - 1))


def wilson(correct: int, n: int) -> list[float] | None:
    """Wilson score 95% interval of a proportion (sound near 0 and 1, unlike the normal one); None for n = 0.

    No continuity correction; exactly [0, ...] at 0 correct and [..., 1] at n correct.
    """
    if n == 0:
        return None
    ci = stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]
