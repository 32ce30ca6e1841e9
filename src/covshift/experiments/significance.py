"""Significance of a claim's per-seed statistic: intervals, p-values, corrections.

A claim's statistic is measured once per seed. Some measurements are exact numbers;
others are known only up to the resolution of what was measured (a time to target
read at evaluations every ``E`` steps lies in ``(s - E, s]``; a threshold read on a
grid lies between two grid values) or are censored (a run that never reaches the
target took *at least* its length; a threshold at the grid's edge is *at least* the
edge). Each seed therefore gives a value ``x_s`` and bounds ``lo_s <= x_s <= hi_s``
(``lo_s = hi_s = x_s`` for an exact number, an infinite bound where censored).

**Interval** (95%, over ``n`` seeds): the Student t interval of the lower bounds'
mean below, and of the upper bounds' mean above::

    [ mean(lo) - t(0.975, n-1) sd(lo) / sqrt(n),  mean(hi) + t(0.975, n-1) sd(hi) / sqrt(n) ]

which is the usual t interval when every seed is exact, wider by the resolution
otherwise, and open (infinite) on a censored side.

**p-values**, one-sided Student t tests of the same bounds against the rule's bound
``b`` (its ``value``, moved by the ``margin`` for the non-strict rules): the
statistic lies above ``b`` (tested on the lower bounds, ``H1: mean > b``) or below
``b`` (on the upper bounds). ``p < 0.025`` is exactly "the 95% interval lies beyond
``b``", so the unadjusted verdict is the interval's. Per rule, ``p_support`` tests the
claim's side and ``p_contradict`` the other side; ``within`` is two one-sided tests
(TOST, Schuirmann 1987): supported when both sides are, ``p = max`` of the two;
contradicted when either opposite side is, ``p = min`` of the two (the two are
exclusive: no sample lies beyond both edges of the band, so at the band's edge the
error stays at the level of one test).

**Corrections** over a family of hypotheses (the battery's, or one preset's):
Holm's step-down (family-wise error rate) and Benjamini-Hochberg's step-up (false
discovery rate); the verdict uses Holm's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "ALPHA",
    "Bounds",
    "benjamini_hochberg",
    "bounded_interval",
    "holm",
    "one_sided_p",
    "rule_p_values",
]

# One-sided level of every test: p < ALPHA on one side is the 95% two-sided interval
# lying beyond the bound, the rule the battery used before p-values were reported.
ALPHA = 0.025


@dataclass(frozen=True)
class Bounds:
    """One seed's measurement: its value and the bounds it is known within."""

    value: float
    lo: float
    hi: float

    @staticmethod
    def exact(value: float) -> Bounds:
        return Bounds(value, value, value)

    def __sub__(self, other: Bounds) -> Bounds:
        return Bounds(self.value - other.value, self.lo - other.hi, self.hi - other.lo)

    @property
    def censored_low(self) -> bool:
        """Known only to lie below its value (an open lower side)."""
        return self.lo == -math.inf

    @property
    def censored_high(self) -> bool:
        return self.hi == math.inf


def _t_half(values: np.ndarray) -> float:
    """Half-width of the 95% t interval of the mean of ``values`` (finite, n >= 2)."""
    n = len(values)
    return float(scipy_stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def bounded_interval(seeds: Sequence[Bounds]) -> tuple[float, float] | None:
    """The 95% interval of the module docstring; None for fewer than 2 seeds."""
    if len(seeds) < 2:
        return None
    lo = np.array([s.lo for s in seeds], dtype=np.float64)
    hi = np.array([s.hi for s in seeds], dtype=np.float64)
    low = -math.inf if not np.all(np.isfinite(lo)) else float(lo.mean()) - _t_half(lo)
    high = math.inf if not np.all(np.isfinite(hi)) else float(hi.mean()) + _t_half(hi)
    return low, high


def one_sided_p(
    values: Sequence[float],
    bound: float,
    above: bool,
    inclusive: bool,
    exact: bool = False,
) -> float | None:
    """p of ``H1: mean > bound`` (``above``) or ``mean < bound``, Student t, ``n - 1``
    degrees of freedom; None for fewer than 2 values.

    A value infinite on the wrong side (a censored bound that could be anywhere) makes
    the side untestable: p = 1. Values infinite on the right side are certainly beyond
    the bound: they are replaced by the least extreme finite value (conservative).

    Without spread (every value the same: a time to target that never came, bounded
    by the run's length on every seed; a grid threshold at the same grid value) the t
    statistic is undefined. Then p is the exact one-sided sign test, ``0.5 ** n`` when
    every value lies beyond the bound (or on it, for the ``inclusive`` rules
    ``not_less``, ``not_greater``, ``within``), else 1: n seeds all on one side is all
    the evidence there is. ``exact`` says the values are exact by construction (a check
    such as "frozen layers drift exactly 0"), where identical values are the expected
    outcome and p is 0 (or 1) instead.
    """
    a = np.asarray(values, dtype=np.float64)
    if len(a) < 2:
        return None
    sign = 1.0 if above else -1.0
    a = sign * a  # test "mean > sign * bound" on the flipped values
    b = sign * bound
    if np.any(a == -math.inf) or np.any(np.isnan(a)):
        return 1.0
    if np.any(a == math.inf):
        finite = a[np.isfinite(a)]
        if not len(finite):
            return 0.0
        a = np.where(np.isfinite(a), a, finite.min())
    mean, sd = float(a.mean()), float(a.std(ddof=1))
    if sd == 0.0 or not math.isfinite(sd):
        beyond = mean > b or (inclusive and mean == b)
        if not beyond:
            return 1.0
        return 0.0 if exact else 0.5 ** len(a)
    t = (mean - b) / (sd / math.sqrt(len(a)))
    return float(scipy_stats.t.sf(t, len(a) - 1))


def rule_p_values(
    rule: str, value: float, margin: float, seeds: Sequence[Bounds], exact: bool = False
) -> tuple[float | None, float | None]:
    """``(p_support, p_contradict)`` of a rule on per-seed bounds (module docstring);
    ``exact``: identical values are exact by construction (:func:`one_sided_p`)."""
    lo = [s.lo for s in seeds]
    hi = [s.hi for s in seeds]
    v, m = value, margin

    def p(values: list[float], bound: float, above: bool, inclusive: bool) -> float | None:
        return one_sided_p(values, bound, above, inclusive, exact)

    if rule == "greater":
        return p(lo, v, True, False), p(hi, v, False, False)
    if rule == "less":
        return p(hi, v, False, False), p(lo, v, True, False)
    if rule == "not_less":
        return p(lo, v - m, True, True), p(hi, v - m, False, False)
    if rule == "not_greater":
        return p(hi, v + m, False, True), p(lo, v + m, True, False)
    if rule == "within":
        above_low = p(lo, v - m, True, True)
        below_high = p(hi, v + m, False, True)
        under = p(hi, v - m, False, False)
        over = p(lo, v + m, True, False)
        if above_low is None or below_high is None or under is None or over is None:
            return None, None
        return max(above_low, below_high), min(under, over)
    raise ValueError(f"unknown rule {rule!r}")


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and is not counted):
    ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the ``m`` sorted p-values."""
    index = [i for i, p in enumerate(p_values) if p is not None]
    order = sorted(index, key=lambda i: p_values[i])  # type: ignore[arg-type, return-value]
    m = len(order)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))  # type: ignore[operator]
        out[i] = running
    return out


def benjamini_hochberg(p_values: Sequence[float | None]) -> list[float | None]:
    """Benjamini-Hochberg step-up adjusted p-values (None stays None):
    ``p~_(i) = min_{j >= i} min(1, m p_(j) / j)``."""
    index = [i for i, p in enumerate(p_values) if p is not None]
    order = sorted(index, key=lambda i: p_values[i])  # type: ignore[arg-type, return-value]
    m = len(order)
    out: list[float | None] = [None] * len(p_values)
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, min(1.0, m * p_values[i] / (rank + 1)))  # type: ignore[operator]
        out[i] = running
    return out
