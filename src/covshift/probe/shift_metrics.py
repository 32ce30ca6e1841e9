"""How far a layer's input distribution moved between probe records.

Every metric compares a record ``t`` with a reference record ``0`` (the first record,
the previous one, or any chosen one), per unit and aggregated per layer; the
formulas, and which stored statistic each is computed from, are in docs/metrics.md:

- :func:`mean_shift`: ``(mu_t - mu_0) / sigma_0``, the mean shift in units of the
  reference standard deviation;
- :func:`log_var_ratio`: ``ln(sigma_t^2 / sigma_0^2)``;
- :func:`gaussian_kl`: ``KL(N(mu_t, sigma_t^2) || N(mu_0, sigma_0^2))`` between Gaussian fits;
- 1-Wasserstein distance between the empirical distributions: per unit from the
  stored quantiles (:func:`quantile_w1`), pooled over units from the stored histograms
  (:func:`histogram_w1`), or exactly from samples when you have them (:func:`sample_w1`).

:func:`compare` computes all of them for two records; :func:`shift_series` for a
series of records read from the store. :func:`quantile_drift` is the first probe's
single drift figure per layer (docs/probe.md).

Numerics: a standard deviation below ``1e-12`` is taken as ``1e-12`` (a dead unit),
so the figures stay finite. A unit whose record has NaN statistics (it held a
non-finite value, see :mod:`covshift.probe.record_summary`) gets NaN figures, and so does a
layer aggregate over it; nothing is averaged around it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Shift",
    "compare",
    "gaussian_kl",
    "histogram_w1",
    "log_var_ratio",
    "mean_shift",
    "quadrature_weights",
    "quantile_drift",
    "quantile_w1",
    "sample_w1",
    "shift_series",
    "unit_quantile_drift",
    "unit_widths",
]

_TINY = 1e-12


def _std(s: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(s, dtype=np.float64), _TINY)


def mean_shift(mean_ref: np.ndarray, std_ref: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``(mu_t - mu_0) / sigma_0`` elementwise (signed)."""
    return (np.asarray(mean, np.float64) - np.asarray(mean_ref, np.float64)) / _std(std_ref)


def log_var_ratio(std_ref: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``ln(sigma_t^2 / sigma_0^2) = 2 ln(sigma_t / sigma_0)`` elementwise (signed)."""
    return 2.0 * (np.log(_std(std)) - np.log(_std(std_ref)))


def gaussian_kl(
    mean_p: np.ndarray, std_p: np.ndarray, mean_q: np.ndarray, std_q: np.ndarray
) -> np.ndarray:
    """``KL(N(mu_p, s_p^2) || N(mu_q, s_q^2))`` elementwise, in nats::

    KL = ln(s_q / s_p) + (s_p^2 + (mu_p - mu_q)^2) / (2 s_q^2) - 1/2
    """
    sp, sq = _std(std_p), _std(std_q)
    d = np.asarray(mean_p, np.float64) - np.asarray(mean_q, np.float64)
    return np.log(sq / sp) + (sp**2 + d**2) / (2.0 * sq**2) - 0.5


def quadrature_weights(levels: Sequence[float]) -> np.ndarray:
    """Weight of each quantile level in :func:`quantile_w1`: the length of the part of
    ``[0, 1]`` nearer to it than to its neighbours (``b_k`` = midpoints, ``b_0 = 0``,
    ``b_K = 1``, ``w_k = b_k - b_{k-1}``). Levels 0.15/0.5/0.85 get 0.325/0.35/0.325."""
    q = np.asarray(levels, dtype=np.float64)
    if q.ndim != 1 or len(q) < 1 or np.any(np.diff(q) <= 0) or q[0] < 0 or q[-1] > 1:
        raise ValueError(f"levels must be increasing values in [0, 1], got {list(q)}")
    bounds = np.concatenate([[0.0], (q[1:] + q[:-1]) / 2.0, [1.0]])
    return np.diff(bounds)


def quantile_w1(
    q_ref: np.ndarray, q: np.ndarray, levels: Sequence[float], axis: int = -2
) -> np.ndarray:
    """1-Wasserstein distance from quantiles: ``sum_k w_k |Q_t(q_k) - Q_0(q_k)|``.

    ``W1 = int_0^1 |F_t^{-1}(p) - F_0^{-1}(p)| dp`` with each quantile function taken as
    the step function equal to ``Q(q_k)`` on the part of ``[0, 1]`` nearest ``q_k``
    (:func:`quadrature_weights`): exactly the W1 between the two distributions of
    atoms ``Q(q_k)`` with masses ``w_k``, and an approximation of the W1 between the
    full distributions whose error shrinks as levels are added. ``axis`` is the
    levels axis (``quantiles`` records are ``(Q, U)``: axis -2).
    """
    w = quadrature_weights(levels)
    diff = np.abs(np.asarray(q, np.float64) - np.asarray(q_ref, np.float64))
    diff = np.moveaxis(diff, axis, -1)
    if diff.shape[-1] != len(w):
        raise ValueError(f"{diff.shape[-1]} quantiles along axis {axis}, but {len(w)} levels")
    return diff @ w


def _cdf_at(x: np.ndarray, counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    cum = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    return np.interp(x, np.asarray(edges, np.float64), cum / cum[-1])


def histogram_w1(
    counts_a: np.ndarray, edges_a: np.ndarray, counts_b: np.ndarray, edges_b: np.ndarray
) -> float:
    """1-Wasserstein distance between two histograms, values spread uniformly in each bin.

    ``W1 = int |F_a(x) - F_b(x)| dx``; both CDFs are piecewise linear between the union
    of the edges, so the integral is exact for the two piecewise-uniform densities (the
    error against the raw values is at most about one bin width).
    """
    if np.sum(counts_a) <= 0 or np.sum(counts_b) <= 0:
        raise ValueError("histogram_w1 needs two histograms with positive total counts")
    x = np.union1d(np.asarray(edges_a, np.float64), np.asarray(edges_b, np.float64))
    d = _cdf_at(x, counts_a, edges_a) - _cdf_at(x, counts_b, edges_b)
    d0, d1, dx = d[:-1], d[1:], np.diff(x)
    same_sign = d0 * d1 >= 0
    # |linear| integrated over a segment: a trapezoid, or two triangles if it crosses 0.
    with np.errstate(invalid="ignore", divide="ignore"):
        crossing = (d0**2 + d1**2) / (2.0 * (np.abs(d0) + np.abs(d1)))
    area = np.where(same_sign, (np.abs(d0) + np.abs(d1)) / 2.0, np.nan_to_num(crossing))
    return float(np.sum(area * dx))


def sample_w1(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 1-Wasserstein distance between the empirical distributions of two 1-D
    samples: ``int |F_a(x) - F_b(x)| dx`` over the sorted pooled values."""
    a = np.sort(np.asarray(a, np.float64).ravel())
    b = np.sort(np.asarray(b, np.float64).ravel())
    x = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, x[:-1], side="right") / len(a)
    fb = np.searchsorted(b, x[:-1], side="right") / len(b)
    return float(np.sum(np.abs(fa - fb) * np.diff(x)))


@dataclass(frozen=True)
class Shift:
    """Metrics of one record against a reference.

    ``units``: per-unit arrays ``(U,)`` (``mean_shift``, ``log_var_ratio``, ``kl``, and
    ``w1`` when quantiles were recorded). ``layer``: aggregates (mean over units of
    ``|mean_shift|``, ``|log_var_ratio|``, ``kl``, ``w1``, and ``w1_rel`` = mean of
    ``w1 / sigma_0``; ``hist_w1`` pooled over units when histograms were recorded).
    """

    units: dict[str, np.ndarray]
    layer: dict[str, float]


def _unit_metrics(
    ref: Mapping[str, np.ndarray], cur: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    out = {
        "mean_shift": mean_shift(ref["mean"], ref["std"], cur["mean"]),
        "log_var_ratio": log_var_ratio(ref["std"], cur["std"]),
        "kl": gaussian_kl(cur["mean"], cur["std"], ref["mean"], ref["std"]),
    }
    if "quantiles" in ref and "quantiles" in cur:
        levels = cur.get("quantile_levels")
        if levels is None:
            raise ValueError("stats have 'quantiles' but no 'quantile_levels' to weight them")
        levels = np.asarray(levels)
        out["w1"] = quantile_w1(
            ref["quantiles"], cur["quantiles"], levels.reshape(-1, levels.shape[-1])[0]
        )
        out["w1_rel"] = out["w1"] / _std(ref["std"])
    return out


def _aggregate(units: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    absolute = {"mean_shift", "log_var_ratio"}
    return {key: (np.abs(v) if key in absolute else v).mean(axis=-1) for key, v in units.items()}


def compare(ref: Mapping[str, np.ndarray], cur: Mapping[str, np.ndarray]) -> Shift:
    """All shift metrics of the record ``cur`` against the record ``ref`` (stats dicts
    of :class:`~covshift.probe.ProbeRecord`, one layer)."""
    units = _unit_metrics(ref, cur)
    layer = {k: float(v) for k, v in _aggregate(units).items()}
    if "hist" in ref and "hist" in cur:
        layer["hist_w1"] = _record_hist_w1(ref, cur)
    return Shift(units, layer)


def _record_hist_w1(ref: Mapping[str, np.ndarray], cur: Mapping[str, np.ndarray]) -> float:
    """:func:`histogram_w1` of two records' pooled histograms; NaN when either record
    has units with non-finite values (its histogram then counts only the other units'
    values: not the same population) or no finite value at all."""
    for record in (ref, cur):
        if np.any(np.asarray(record.get("nonfinite_units", 0)) > 0):
            return float("nan")
    return histogram_w1(ref["hist"], ref["hist_edges"], cur["hist"], cur["hist_edges"])


def shift_series(
    stats: Mapping[str, np.ndarray], reference: str | int = "first"
) -> dict[str, np.ndarray]:
    """Layer aggregates of :func:`compare` for every record of a series.

    Args:
        stats: stat name -> values stacked over ``R`` records (what
            ``Store.probe(run, layer, stat)`` returns), at least ``mean`` and ``std``.
        reference: ``"first"`` (every record against record 0), ``"previous"`` (each
            against the one before; record 0 gets zeros), or a record index.

    Returns:
        metric name -> ``(R,)`` array (``hist_w1`` included when histograms exist).
    """
    n = len(stats["mean"])
    if reference == "first":
        ref_index = np.zeros(n, dtype=np.int64)
    elif reference == "previous":
        ref_index = np.maximum(np.arange(n) - 1, 0)
    elif isinstance(reference, (int, np.integer)) and -n <= reference < n:
        ref_index = np.full(n, int(reference) % n)
    else:
        raise ValueError(
            f"reference must be 'first', 'previous' or a record index in [{-n}, {n}), "
            f"got {reference!r}"
        )
    ref = {k: np.asarray(v)[ref_index] for k, v in stats.items()}
    cur = {k: np.asarray(v) for k, v in stats.items()}
    out = _aggregate(_unit_metrics(ref, cur))
    if "hist" in stats and "hist_edges" in stats:
        out["hist_w1"] = np.array(
            [
                _record_hist_w1(
                    {k: v[r] for k, v in ref.items()}, {k: v[r] for k, v in cur.items()}
                )
                for r in range(n)
            ]
        )
    return out


def unit_quantile_drift(quantiles: np.ndarray) -> np.ndarray:
    """Per-unit drift from records of quantiles, shape ``(R, Q, U)`` -> ``(U,)``.

    The first probe's figure (docs/probe.md)::

        drift = (1/U) sum_u (1/|Q|) sum_q |Q_{u,q}(T) - Q_{u,q}(0)| / w_u
        w_u   = (1/R) sum_r (Q_{u,hi}(r) - Q_{u,lo}(r))

    ``quantiles[r, q, u]`` is quantile ``q`` of unit ``u`` at record ``r``, the
    quantile levels increasing along ``q``. Needs at least two records and two levels.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 3 or q.shape[0] < 2 or q.shape[1] < 2:
        raise ValueError(
            f"expected quantile records of shape (records >= 2, levels >= 2, units), got {q.shape}"
        )
    displacement = np.abs(q[-1] - q[0]).mean(axis=0)  # (U,)
    return displacement / unit_widths(q)


def unit_widths(quantiles: np.ndarray) -> np.ndarray:
    """``w_u``, the drift's unit of length: each unit's outer-quantile width averaged
    over the records, ``(R, Q, U)`` -> ``(U,)`` (at least ``1e-12``)."""
    q = np.asarray(quantiles, dtype=np.float64)
    return np.maximum((q[:, -1, :] - q[:, 0, :]).mean(axis=0), _TINY)


def quantile_drift(quantiles: np.ndarray) -> float:
    """Layer drift: :func:`unit_quantile_drift` averaged over units."""
    return float(unit_quantile_drift(quantiles).mean())
