"""Per-unit statistics of a layer's values: streaming moments, quantiles, histograms.

A *unit* is a feature of a fully connected layer or a channel of a convolution. For a
tensor of shape ``(N, C, *spatial)`` the values of unit ``c`` are all ``N * prod(spatial)``
entries of channel ``c`` (the examples and positions the unit sees); for ``(N, C)`` they
are the ``N`` examples. ``unit_dim`` chooses another axis (``-1`` for the features of a
token sequence ``(N, T, E)``); the probe finds it per layer (:mod:`covshift.probe.units`).

Everything runs on the tensor's device; moments are accumulated in float64 with the
pairwise update of Chan, Golub & LeVeque (1979), so that summaries of chunks, of
successive batches or of the shards of several processes merge into exactly the
summary of the concatenated values (up to float64 rounding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from covshift.probe.saturation import tail_threshold

__all__ = [
    "Moments",
    "histogram_edges",
    "quantiles_of_sorted",
    "row_mean_m2",
    "row_quantiles",
    "sort_rows",
    "sorted_histogram",
    "sorted_saturated",
    "unit_histogram",
    "unit_moments",
    "unit_quantiles",
    "unit_rows",
    "unit_view",
]

# Values per unit per float64 chunk when accumulating moments: bounds the temporary
# float64 copy (2**16 x 64 channels = 32 MiB) whatever the size of the probed tensor.
_CHUNK_ROWS = 1 << 16


def unit_view(x: torch.Tensor, unit_dim: int = 1) -> torch.Tensor:
    """Arrange values as ``(M, U)``: rows are observations, columns are units.

    ``(N, U)`` is returned as is; ``(N, C, *spatial)`` becomes ``(N * prod(spatial), C)``
    with rows ordered ``(n, *spatial)``; ``unit_dim`` picks the unit axis (default 1,
    the channels; ``-1`` for the last axis).
    """
    if x.dim() < 2:
        raise ValueError(f"expected a batch of shape (N, C, ...), got shape {tuple(x.shape)}")
    dim = unit_dim % x.dim()
    if dim == 0:
        raise ValueError(
            f"unit_dim={unit_dim} points at the batch axis of shape {tuple(x.shape)}; "
            "use 1 (channels) or -1 (last axis)"
        )
    if x.dim() == 2:
        return x
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])  # (..., U) -> (M, U)


def unit_rows(x: torch.Tensor, unit_dim: int = 1) -> torch.Tensor:
    """The transpose of :func:`unit_view`: ``(U, M)``, one row of values per unit, in the
    same order. Rows are what per-unit sorting and reductions along them want; for
    ``(N, C, *spatial)`` inputs it costs one copy (as :func:`unit_view` does)."""
    if x.dim() < 2 or unit_dim % x.dim() == 0:
        unit_view(x, unit_dim)  # raises the error that says what was expected
    if x.dim() == 2:
        return x.t()
    dim = unit_dim % x.dim()
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)  # (U, N * prod(rest))


def row_mean_m2(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and sum of squared deviations of ``(U, m)`` values, float64.

    Shifted two-pass: ``mean = (sum_i x_i) / m`` accumulated in float64; with ``c`` the
    mean rounded to the values' dtype, ``m2 = sum_i (x_i - c)^2 - m (mean - c)^2``, the
    squares summed in float64. The deviations ``x - c`` are formed in the values' own
    precision (exact when ``x`` is within a factor 2 of ``c``), so no float64 copy of
    the values is made; the relative error of ``m2`` is that of one float32 product
    (~1e-7), the precision the probe stores anyway. On the CPU numpy's reductions do
    this several times faster than torch's.
    """
    m = rows.shape[1]
    if _numpy_ok(rows):
        a = rows.detach().numpy()
        # Non-finite values make non-finite sums (counted by the caller, not warned
        # about); squares of float32 deviations past ~1.8e19 overflow, and those rows
        # are summed again in float64 below.
        with np.errstate(over="ignore", invalid="ignore"):
            mean = np.add.reduce(a, axis=1, dtype=np.float64) / m
            c = mean.astype(a.dtype)
            d = a - c[:, None]
            np.square(d, out=d)
            m2 = np.add.reduce(d, axis=1, dtype=np.float64) - m * (mean - c) ** 2
        overflowed = np.isfinite(mean) & ~np.isfinite(m2)
        if overflowed.any():
            m2[overflowed] = _m2_float64(a[overflowed], mean[overflowed])
        return torch.from_numpy(mean), torch.from_numpy(m2)
    mean = rows.sum(dim=1, dtype=torch.float64) / m
    c = mean.to(rows.dtype)
    d = rows - c[:, None]
    m2 = (d * d).sum(dim=1, dtype=torch.float64) - m * (mean - c.double()).square()
    # Finite values whose float32 squares overflowed: those rows again in float64 (the
    # test is one synchronization on CUDA, taken for the right number).
    overflowed = torch.isfinite(mean) & ~torch.isfinite(m2)
    if bool(overflowed.any()):
        again = (rows[overflowed].double() - mean[overflowed, None]).square().sum(dim=1)
        m2 = m2.masked_scatter(overflowed, again)
    return mean, m2


def _numpy_ok(rows: torch.Tensor) -> bool:
    """Whether numpy can reduce ``rows`` in place (CPU, float32 or float64)."""
    return rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64)


def _m2_float64(a: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Sum of squared deviations of rows of finite ``a`` around ``mean``, in float64
    (float32 values are below 3.5e38, so their squares stay below 1.2e77)."""
    d = a.astype(np.float64) - mean[:, None]
    with np.errstate(over="ignore"):  # float64 values past 1e154: +inf, an honest answer
        return np.add.reduce(d * d, axis=1)


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations, per unit, in float64.

    ``count`` is a 0-d tensor, ``mean`` and ``m2`` have shape ``(U,)``; the variance is
    ``m2 / count`` (biased, 1/M: the statistic of the values themselves, not an
    estimate of a population).
    """

    count: torch.Tensor  # () float64
    mean: torch.Tensor  # (U,) float64
    m2: torch.Tensor  # (U,) float64

    @staticmethod
    def of(values: torch.Tensor) -> Moments:
        """Moments of ``(M, U)`` values (columns are units), in float64."""
        return Moments.of_rows(values.t())

    @staticmethod
    def of_rows(rows: torch.Tensor) -> Moments:
        """Moments of ``(U, M)`` values (rows are units), chunk by chunk, merged with
        :meth:`merge`. Sums are accumulated in float64 (see :func:`row_mean_m2`)."""
        total: Moments | None = None
        for start in range(0, max(rows.shape[1], 1), _CHUNK_ROWS):
            chunk = rows[:, start : start + _CHUNK_ROWS]  # (U, m)
            mean, m2 = row_mean_m2(chunk)
            count = torch.full((), float(chunk.shape[1]), dtype=torch.float64, device=chunk.device)
            part = Moments(count, mean, m2)
            total = part if total is None else total.merge(part)
        assert total is not None
        return total

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of both sets of values (Chan et al. 1979)::

        n = n_a + n_b,  d = mean_b - mean_a
        mean = mean_a + d n_b / n
        m2 = m2_a + m2_b + d^2 n_a n_b / n
        """
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @staticmethod
    def stack_merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> Moments:
        """Merge ``K`` groups at once: ``count (K,)``, ``mean (K, U)``, ``m2 (K, U)``::

        n = sum_k n_k,  mean = sum_k n_k mean_k / n,
        m2 = sum_k m2_k + sum_k n_k (mean_k - mean)^2
        """
        n = count.sum()
        weights = (count / n)[:, None]  # (K, 1)
        total_mean = (weights * mean).sum(dim=0)
        spread = (count[:, None] * (mean - total_mean).square()).sum(dim=0)
        return Moments(n, total_mean, m2.sum(dim=0) + spread)

    def pooled(self) -> Moments:
        """Moments of all units' values together (each unit has ``count`` values)::

        mean = (1/U) sum_u mean_u,   m2 = sum_u m2_u + count sum_u (mean_u - mean)^2
        """
        units = self.mean.shape[0]
        mean = self.mean.mean()
        m2 = self.m2.sum() + self.count * (self.mean - mean).square().sum()
        return Moments(self.count * units, mean.reshape(1), m2.reshape(1))

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


def unit_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and standard deviation (biased, 1/M) of ``(M, U)`` values,
    accumulated in float64."""
    m = Moments.of(values)
    return m.mean, m.std


@functools.lru_cache(maxsize=256)
def _order_positions(
    levels: tuple[float, ...], m: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Computed once per (levels, M, device): a record then indexes without building
    # small tensors (which on CUDA would be host-to-device copies).
    h = [(m - 1) * q for q in levels]
    lo = [min(math.floor(x), m - 1) for x in h]
    hi = [min(i + 1, m - 1) for i in lo]
    frac = [x - i for x, i in zip(h, lo, strict=True)]
    return (
        torch.tensor(lo, device=device),
        torch.tensor(hi, device=device),
        torch.tensor(frac, dtype=dtype, device=device),
    )


def quantiles_of_sorted(sorted_values: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Quantiles along dim 0 of values sorted along dim 0: ``(M, ...)`` -> ``(Q, ...)``.

    Linear interpolation between order statistics, numpy's default (``linear``)::

        h = (M - 1) q,   Q(q) = v_(floor h) + (h - floor h) (v_(floor h + 1) - v_(floor h))
    """
    lo, hi, frac = _order_positions(
        tuple(float(q) for q in levels),
        sorted_values.shape[0],
        sorted_values.device,
        sorted_values.dtype,
    )
    frac = frac.view(-1, *([1] * (sorted_values.dim() - 1)))
    return torch.lerp(sorted_values[lo], sorted_values[hi], frac)


def unit_quantiles(values: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """Per-unit quantiles of ``(M, U)`` values, shape ``(len(quantiles), U)``.

    Linear interpolation between order statistics (numpy's default ``linear``
    method): ``Q(q) = v[(M-1) q]`` interpolated, ``v`` sorted per unit. Sorting, not
    ``torch.quantile``, so that tensors of any size work.
    """
    if not all(0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    v = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    return quantiles_of_sorted(v.sort(dim=0).values, quantiles)


@functools.lru_cache(maxsize=64)
def _unit_steps(bins: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=device)


def histogram_edges(
    lo: torch.Tensor, hi: torch.Tensor, bins: int, dtype: torch.dtype
) -> torch.Tensor:
    """``bins + 1`` equal-width edges from ``lo`` to ``hi`` (0-d tensors), in ``dtype``.

    The range adapts to the values (their minimum and maximum); a constant tensor gets
    the range ``[v - 0.5, v + 0.5]``, as ``numpy.histogram`` does.
    """
    lo, hi = lo.double(), hi.double()
    flat = hi <= lo
    lo = torch.where(flat, lo - 0.5, lo)
    hi = torch.where(flat, hi + 0.5, hi)
    edges = lo + _unit_steps(bins, lo.device) * (hi - lo)
    edges[-1] = hi  # exactly the maximum, so that it falls in the last bin
    return edges.to(dtype)


def unit_histogram(
    values: torch.Tensor, edges: torch.Tensor, per_unit: bool = True
) -> torch.Tensor:
    """Counts of ``(M, U)`` values in the bins of ``edges`` (``B + 1``, increasing, same
    dtype as ``values``): shape ``(U, B)`` per unit, or ``(B,)`` with ``per_unit=False``
    (all units pooled), int64.

    Bins are ``[e_k, e_{k+1})``, the last one closed ``[e_{B-1}, e_B]``: numpy's
    convention, so ``numpy.histogram(v, bins=edges)`` gives the same counts. Values
    below ``e_0`` count in the first bin, above ``e_B`` in the last (the probe's edges
    span the values' own range, so there are none).
    """
    m, units = values.shape
    bins = edges.shape[0] - 1
    size = units * bins if per_unit else bins
    counts = torch.zeros(size, dtype=torch.int64, device=values.device)
    inner = edges[1:-1].contiguous()
    offsets = torch.arange(units, device=values.device) * bins if per_unit else None
    for start in range(0, max(m, 1), _CHUNK_ROWS):
        # right=True: index k with e_k <= v < e_{k+1}; v == e_B lands in bin B - 1.
        index = torch.bucketize(values[start : start + _CHUNK_ROWS], inner, right=True)
        if offsets is not None:
            index = index + offsets  # (m, U): unit u's bins start at u * B
        counts += torch.bincount(index.reshape(-1), minlength=size)
    return counts.view(units, bins) if per_unit else counts


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` sorted along dim 1 (values only).

    On the CPU this is numpy's sort on the same memory: ``torch.sort`` always sorts
    (value, index) pairs and is tens of times slower there (0.1 ms vs 4 ms for 100 rows
    of 1000 floats on one core). Elsewhere (CUDA) it is ``torch.sort``.
    """
    if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(rows.detach().contiguous().numpy(), axis=1))
    return rows.sort(dim=1).values


def row_quantiles(sorted_rows: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Quantiles of each row of ``(U, M)`` values sorted along rows: shape ``(Q, U)``
    (numpy's ``linear`` method, as :func:`quantiles_of_sorted`)."""
    return quantiles_of_sorted(sorted_rows.t(), levels)


def sorted_histogram(sorted_rows: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Per-row counts ``(U, B)`` of ``(U, M)`` values sorted along rows, in the bins of
    ``edges`` spanning at least their range: ``U x (B + 1)`` binary searches instead of
    one per value. Same convention as :func:`unit_histogram` (numpy's)::

        count_k = #(v < e_{k+1}) - #(v < e_k),   last bin: M - #(v < e_{B-1})
    """
    units, m = sorted_rows.shape
    bounds = edges.to(sorted_rows.dtype).expand(units, -1).contiguous()  # (U, B + 1)
    below = torch.searchsorted(sorted_rows.contiguous(), bounds)  # #(v < e_k), (U, B + 1)
    below[:, -1] = m  # the last bin is closed: every value <= e_B counts
    return below.diff(dim=1)


def sorted_saturated(sorted_rows: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    """Per-row count of saturated inputs (see :mod:`covshift.probe.saturation`) of
    ``(U, M)`` values sorted along rows, by binary search: shape ``(U,)``, float64."""
    rows = sorted_rows.contiguous()
    units, m = rows.shape
    t = tail_threshold(kind, slope)

    def count_below(x: float, right: bool = False) -> torch.Tensor:
        # torch.full, not torch.tensor: no host-to-device copy on CUDA.
        bound = torch.full((units, 1), x, dtype=rows.dtype, device=rows.device)
        return torch.searchsorted(rows, bound, right=right)[:, 0]

    if kind == "relu":
        return count_below(0.0).double()  # #(v < 0)
    return (count_below(-t) + m - count_below(t, right=True)).double()  # #(v < -t) + #(v > t)
