"""Shift metrics against direct SciPy/NumPy computations and closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from covshift.probe import ShiftProbe, compare, shift_series
from covshift.probe.shift_metrics import (
    gaussian_kl,
    histogram_w1,
    log_var_ratio,
    mean_shift,
    quadrature_weights,
    quantile_w1,
    sample_w1,
)

rng = np.random.default_rng(0)


def test_mean_shift_and_log_variance_ratio() -> None:
    assert mean_shift(1.0, 2.0, 4.0) == pytest.approx(1.5)
    assert log_var_ratio(2.0, 4.0) == pytest.approx(np.log(4.0))
    a = rng.normal(size=(3, 5))
    np.testing.assert_allclose(
        log_var_ratio(np.abs(a[0]), np.abs(a[1])), np.log(a[1] ** 2 / a[0] ** 2)
    )


@pytest.mark.parametrize(
    ("mp", "sp", "mq", "sq"), [(0, 1, 0, 1), (1.0, 0.5, -0.3, 2.0), (3, 2, 0, 1)]
)
def test_gaussian_kl_against_numerical_integration(
    mp: float, sp: float, mq: float, sq: float
) -> None:
    p, q = stats.norm(mp, sp), stats.norm(mq, sq)
    numeric, _ = integrate.quad(
        lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30, limit=200
    )
    assert gaussian_kl(mp, sp, mq, sq) == pytest.approx(numeric, abs=1e-8)


def test_quantile_w1_is_the_w1_of_weighted_atoms() -> None:
    levels = [0.15, 0.5, 0.85]
    np.testing.assert_allclose(quadrature_weights(levels), [0.325, 0.35, 0.325])
    qa, qb = np.sort(rng.normal(size=(3, 4)), axis=0), np.sort(rng.normal(size=(3, 4)) + 1, axis=0)
    w = quadrature_weights(levels)
    expected = [
        stats.wasserstein_distance(qa[:, u], qb[:, u], u_weights=w, v_weights=w) for u in range(4)
    ]
    np.testing.assert_allclose(quantile_w1(qa, qb, levels), expected, rtol=1e-12)


def test_quantile_w1_converges_to_the_sample_w1() -> None:
    a, b = rng.normal(0, 1, 20_000), rng.normal(0.4, 1.5, 20_000)
    levels = (np.arange(200) + 0.5) / 200
    approx = quantile_w1(np.quantile(a, levels)[:, None], np.quantile(b, levels)[:, None], levels)
    assert approx[0] == pytest.approx(stats.wasserstein_distance(a, b), rel=0.02)


def test_sample_w1_matches_scipy() -> None:
    a, b = rng.normal(size=37), rng.exponential(size=53)
    assert sample_w1(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12)


def test_histogram_w1_exact_cases_and_against_scipy() -> None:
    # Uniform on [0, 1] vs uniform on [1, 2]: a shift by 1.
    assert histogram_w1([5], [0, 1], [5], [1, 2]) == pytest.approx(1.0)
    # Uniform on [0, 1] vs [0, 2]: quantile functions p and 2p, W1 = int p dp = 1/2.
    assert histogram_w1([3], [0, 1], [3, 3], [0, 1, 2]) == pytest.approx(0.5)
    # Two adaptive-range histograms: compare with scipy on a fine discretization of the
    # same piecewise-uniform densities.
    ca, ea = np.array([1, 5, 2, 0, 4]), np.linspace(-1, 2, 6)
    cb, eb = np.array([2, 2, 7]), np.linspace(0.3, 3.1, 4)
    k = 2000

    def atoms(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = [
            np.linspace(lo, hi, k, endpoint=False) + (hi - lo) / (2 * k)
            for lo, hi in itertools.pairwise(edges)
        ]
        return np.concatenate(pts), np.repeat(counts / k, k)

    (xa, wa), (xb, wb) = atoms(ca, ea), atoms(cb, eb)
    expected = stats.wasserstein_distance(xa, xb, wa, wb)
    assert histogram_w1(ca, ea, cb, eb) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="positive total counts"):
        histogram_w1([0], [0, 1], [1], [0, 1])


def two_records() -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Records of a real probe on two known batches, and the raw values."""
    net = torch.nn.Sequential(torch.nn.Identity())
    a = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1))
    b = a * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 1.0, -2.0])
    levels = tuple((np.arange(50) + 0.5) / 50)
    ra = ShiftProbe(net, ["0"], a, quantiles=levels, bins=64).record_now(0)[0].stats
    rb = ShiftProbe(net, ["0"], b, quantiles=levels, bins=64).record_now(1)[0].stats
    return ra, rb, a.double().numpy(), b.double().numpy()


def test_compare_on_probe_records() -> None:
    ra, rb, a, b = two_records()
    shift = compare(ra, rb)
    ma, sa, mb, sb = a.mean(0), a.std(0), b.mean(0), b.std(0)
    np.testing.assert_allclose(shift.units["mean_shift"], (mb - ma) / sa, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        shift.units["log_var_ratio"], np.log(sb**2 / sa**2), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        shift.units["kl"], np.log(sa / sb) + (sb**2 + (mb - ma) ** 2) / (2 * sa**2) - 0.5, rtol=1e-4
    )
    exact_w1 = [stats.wasserstein_distance(a[:, u], b[:, u]) for u in range(3)]
    np.testing.assert_allclose(shift.units["w1"], exact_w1, rtol=0.03)  # 50 levels
    assert shift.layer["mean_shift"] == pytest.approx(np.abs((mb - ma) / sa).mean(), rel=1e-5)
    assert shift.layer["kl"] == pytest.approx(shift.units["kl"].mean())
    # Pooled over units, from the histograms (64 bins): close to the exact pooled W1.
    pooled = stats.wasserstein_distance(a.ravel(), b.ravel())
    assert shift.layer["hist_w1"] == pytest.approx(pooled, rel=0.03)
    same = compare(ra, ra)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in same.layer.values())


def test_shift_series_references() -> None:
    ra, rb, _, _ = two_records()
    series = {k: np.stack([ra[k], rb[k], rb[k]]) for k in ra}
    first = shift_series(series)
    assert first["kl"][0] == pytest.approx(0.0, abs=1e-12)
    assert first["kl"][1] == pytest.approx(compare(ra, rb).layer["kl"])
    assert first["hist_w1"][2] == pytest.approx(compare(ra, rb).layer["hist_w1"])
    prev = shift_series(series, reference="previous")
    np.testing.assert_allclose(prev["mean_shift"][[0, 2]], 0.0, atol=1e-12)
    last = shift_series(series, reference=-1)
    assert last["w1"][1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="reference must be 'first', 'previous' or a record"):
        shift_series(series, reference="last")
