"""Intervals, p-values and multiple-comparison corrections of the claims, against
SciPy's tests and the textbook rejection procedures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from covshift.experiments.significance import (
    ALPHA,
    Bounds,
    benjamini_hochberg,
    bounded_interval,
    holm,
    one_sided_p,
    rule_p_values,
)
from covshift.experiments.verdicts import spearman_permutation_p


def _holm_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm's step-down procedure at level alpha: the indices it rejects."""
    order = np.argsort(p)
    m = len(p)
    out = set()
    for k, i in enumerate(order):
        if p[i] > alpha / (m - k):
            break
        out.add(int(i))
    return out


def _bh_rejects(p: list[float], alpha: float) -> set[int]:
    """Benjamini-Hochberg's step-up procedure at level alpha."""
    order = np.argsort(p)
    m = len(p)
    passing = [k for k in range(m) if p[order[k]] <= (k + 1) * alpha / m]
    return {int(i) for i in order[: max(passing) + 1]} if passing else set()


@pytest.mark.parametrize("seed", range(5))
def test_adjusted_p_values_reject_what_the_procedures_reject(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = list(np.concatenate([rng.uniform(0, 0.01, 6), rng.uniform(0, 1, 14)]))
    h, b = holm(p), benjamini_hochberg(p)
    for alpha in (0.001, 0.01, 0.025, 0.05, 0.2):
        assert {i for i, q in enumerate(h) if q <= alpha} == _holm_rejects(p, alpha)
        assert {i for i, q in enumerate(b) if q <= alpha} == _bh_rejects(p, alpha)
    assert all(q >= x for q, x in zip(h, p, strict=True))  # never below the raw p
    assert all(hq >= bq - 1e-15 for hq, bq in zip(h, b, strict=True))  # Holm is stricter


def test_adjustments_skip_missing_p_values() -> None:
    p = [0.01, None, 0.04, None]
    assert holm(p) == [pytest.approx(0.02), None, pytest.approx(0.04), None]
    assert benjamini_hochberg(p) == [pytest.approx(0.02), None, pytest.approx(0.04), None]
    assert holm([]) == [] and holm([None]) == [None]


def test_one_sided_p_is_scipys_t_test() -> None:
    values = [0.3, 0.5, 0.45, 0.61, 0.2]
    for bound in (0.0, 0.4, 0.7):
        up = stats.ttest_1samp(values, bound, alternative="greater").pvalue
        down = stats.ttest_1samp(values, bound, alternative="less").pvalue
        assert one_sided_p(values, bound, True, False) == pytest.approx(up)
        assert one_sided_p(values, bound, False, False) == pytest.approx(down)
    assert one_sided_p([0.3], 0.0, True, False) is None


def test_one_sided_p_without_spread_and_with_censored_values() -> None:
    # no spread: the exact sign test (n seeds all beyond the bound), 0 for exact checks
    assert one_sided_p([2.0, 2.0, 2.0], 1.0, True, False) == 0.5**3
    assert one_sided_p([2.0, 2.0, 2.0], 1.0, True, False, exact=True) == 0.0
    assert one_sided_p([1.0, 1.0], 1.0, True, False) == 1.0  # on the bound: not above
    assert one_sided_p([1.0, 1.0], 1.0, True, True) == 0.25  # but "at or above" holds
    assert one_sided_p([1.0, 1.0], 1.0, True, True, exact=True) == 0.0
    # a lower bound of -inf (the value could be anything below): cannot show "above"
    assert one_sided_p([3.0, -math.inf, 4.0], 0.0, True, False) == 1.0
    # values certainly above: replaced by the least extreme finite one (conservative)
    expected = stats.ttest_1samp([3.0, 3.0, 4.0], 0.0, alternative="greater").pvalue
    assert one_sided_p([3.0, math.inf, 4.0], 0.0, True, False) == pytest.approx(expected)


def test_bounded_interval_widens_by_the_resolution_and_opens_when_censored() -> None:
    exact = [Bounds.exact(v) for v in (1.0, 2.0, 4.0)]
    _, (lo, hi) = (None, bounded_interval(exact))
    mean, sd = np.mean([1, 2, 4]), np.std([1, 2, 4], ddof=1)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert (lo, hi) == pytest.approx((mean - half, mean + half))
    # times to target known to an evaluation interval of 250 steps
    steps = np.array([1000.0, 1250.0, 1750.0])
    timed = [Bounds(v, v - 250, v) for v in steps]
    low, high = bounded_interval(timed)
    half_steps = stats.t.ppf(0.975, 2) * steps.std(ddof=1) / math.sqrt(3)
    assert low == pytest.approx(steps.mean() - 250 - half_steps)
    assert high == pytest.approx(steps.mean() + half_steps)
    assert bounded_interval([*exact, Bounds(9.0, 9.0, math.inf)])[1] == math.inf
    assert bounded_interval(exact[:1]) is None
    diff = Bounds(5.0, 4.0, 6.0) - Bounds(1.0, 0.5, math.inf)
    assert (diff.value, diff.lo, diff.hi) == (4.0, -math.inf, 5.5)


def test_rule_p_values_of_a_band() -> None:
    inside = [Bounds.exact(v) for v in (0.01, -0.005, 0.0, 0.004)]
    support, against = rule_p_values("within", 0.0, 0.05, inside)
    lo = stats.ttest_1samp([b.lo for b in inside], -0.05, alternative="greater").pvalue
    hi = stats.ttest_1samp([b.hi for b in inside], 0.05, alternative="less").pvalue
    assert support == pytest.approx(max(lo, hi)) and support < ALPHA
    assert against > 0.5
    outside = [Bounds.exact(v) for v in (0.2, 0.25, 0.22)]
    assert rule_p_values("within", 0.0, 0.05, outside)[1] < ALPHA


def _exact_null(ranks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Every permutation of every seed's y values: the exact null distribution of the
    mean of the per-seed Spearman correlations."""
    import itertools

    per_seed = []
    for xs, ys in ranks:
        per_seed.append(
            [stats.spearmanr(xs, list(perm)).statistic for perm in itertools.permutations(ys)]
        )
    return np.array([np.mean(c) for c in itertools.product(*per_seed)])


def test_spearman_permutation_p_matches_the_exact_null() -> None:
    xs = np.array([2.0, 4.0, 8.0, 16.0])
    ranks = [(xs, np.array([0.1, 0.3, 0.2, 0.5])), (xs, np.array([0.2, 0.1, 0.4, 0.9]))]
    observed = np.mean([stats.spearmanr(x, y).statistic for x, y in ranks])
    null = _exact_null(ranks)
    exact = np.mean(null >= observed - 1e-12)
    assert spearman_permutation_p(ranks, observed, True) == pytest.approx(exact, abs=0.01)
    perfect = [(xs, xs * 2.0)] * 3  # +1 on every seed: (1/24)^3 under the null
    p = spearman_permutation_p(perfect, 1.0, True)
    assert p < 5e-4  # exact: (1/24)^3 = 7e-5, one in 20,000 draws or fewer reach it
    assert spearman_permutation_p(perfect, 1.0, False) == 1.0
