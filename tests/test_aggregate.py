"""The interval over seeds uses Student-t quantiles (checked against published values)."""

import pytest

from stages.aggregate import _t95


@pytest.mark.parametrize(("n", "t"), [(2, 12.706), (5, 2.776), (11, 2.228), (16, 2.131), (31, 2.042), (121, 1.980)])
def test_t_quantiles(n: int, t: float) -> None:
    assert _t95(n) == pytest.approx(t, abs=2e-3)
