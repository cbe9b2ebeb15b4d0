"""The two interval formulas of the study, in one place: Student-t over seeds, Wilson over items."""

from __future__ import annotations

import math


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n-1 degrees of freedom.

    Exact table up to 10 samples; beyond, the Cornish-Fisher expansion around z = 1.95996 (error
    < 1e-3 from 10 degrees of freedom on), so 11-30 seeds do not get the too-narrow normal interval.
    """
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    if n in table:
        return table[n]
    z, v = 1.959964, n - 1
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def wilson(correct: int, n: int, z: float = 1.959964) -> list[float] | None:
    """Wilson score 95% interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return None
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]
