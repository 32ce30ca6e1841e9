"""A claim's statistic on one seed: ``difference``, ``value``, ``trend``,
``layer_trend`` and ``threshold`` (their definitions are in
:mod:`covshift.experiments.claim_spec`).

Each function reads the points of one seed and one slice and returns a
:class:`SeedOutcome`: the statistic with the bounds it is known within (a time to
target to its evaluation interval, a threshold to the grid's resolution, censored
where the grid or the run ends first), what the figure draws, and, where a metric
could not be measured honestly (degenerate units), the reason instead of a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from covshift.experiments.claim_spec import ClaimSpec
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import Point
from covshift.experiments.metric_paths import TRAIN_MODE, parse_metric
from covshift.experiments.numbers import PointNumbers, Reading
from covshift.experiments.significance import Bounds
from covshift.probe.select import glob_match

__all__ = ["STATISTICS", "PointTable", "SeedOutcome"]


@dataclass
class SeedOutcome:
    """The statistic of one seed (None: no value), with what it was computed from."""

    bounds: Bounds | None
    data: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why no honest value exists (degenerate units)
    excluded: int = 0
    units: int = 0
    # (x, y) of a Spearman statistic, for its permutation test
    ranks: list[tuple[np.ndarray, np.ndarray]] | None = None


def _key(network: str, axes: dict[str, Any], seed: int) -> tuple[Any, ...]:
    return (network, tuple(sorted(axes.items())), seed)


class PointTable:
    """Points and their numbers, looked up by network, axis values and seed."""

    def __init__(self, points: Sequence[Point], numbers: dict[str, PointNumbers]) -> None:
        self.numbers = {_key(p.network, p.axes, p.seed): numbers[p.id] for p in points}

    def point(self, network: str, axes: dict[str, Any], seed: int) -> PointNumbers | None:
        return self.numbers.get(_key(network, axes, seed))

    def reading(self, network: str, axes: dict[str, Any], seed: int, metric: str) -> Reading:
        found = self.point(network, axes, seed)
        return found.reading(metric) if found is not None else Reading(None)

    def diverged(self, network: str, axes: dict[str, Any], seed: int) -> bool:
        found = self.point(network, axes, seed)
        return found is not None and found.diverged


def _combine(readings: Sequence[Reading], bounds: Bounds | None, data: dict) -> SeedOutcome:
    """An outcome from the readings it was computed from: any unmeasurable reading
    makes it unmeasurable (a statistic over the measurable part only would choose its
    sample by the artifact)."""
    reasons = [r.reason for r in readings if r.reason]
    excluded = sum(r.excluded for r in readings)
    units = sum(r.units for r in readings)
    if reasons:
        return SeedOutcome(None, data, "; ".join(dict.fromkeys(reasons)), excluded, units)
    return SeedOutcome(bounds, data, None, excluded, units)


def _difference(
    table: PointTable, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int
) -> SeedOutcome:
    b_axes = {k: claim.baseline_where.get(k, v) for k, v in axes.items()}
    base_metric = claim.baseline_metric or claim.metric
    if claim.interaction:  # [net - base] at where, minus the same at baseline_where
        assert claim.baseline is not None
        read = [
            table.reading(net, at, seed, metric)
            for at in (axes, b_axes)
            for net, metric in ((claim.network, claim.metric), (claim.baseline, base_metric))
        ]
        gaps = [
            x.bounds - y.bounds if x.bounds is not None and y.bounds is not None else None
            for x, y in (read[:2], read[2:])
        ]
        data = {
            "network": gaps[0].value if gaps[0] else None,
            "baseline": gaps[1].value if gaps[1] else None,
        }
        found = gaps[0] - gaps[1] if gaps[0] is not None and gaps[1] is not None else None
        return _combine(read, found, data)
    a = table.reading(claim.network, axes, seed, claim.metric)
    b = table.reading(claim.baseline or claim.network, b_axes, seed, base_metric)
    data = {"network": a.value, "baseline": b.value}
    found = a.bounds - b.bounds if a.bounds is not None and b.bounds is not None else None
    return _combine([a, b], found, data)


def _value(
    table: PointTable, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int
) -> SeedOutcome:
    a = table.reading(claim.network, axes, seed, claim.metric)
    return _combine([a], a.bounds, {"network": a.value})


def _fit(
    claim: ClaimSpec, xs: np.ndarray, ys: np.ndarray, log_axis: bool
) -> tuple[float | None, list[tuple[np.ndarray, np.ndarray]] | None]:
    if claim.method == "spearman":
        if np.ptp(ys) == 0 or np.ptp(xs) == 0:
            return None, None
        return float(scipy_stats.spearmanr(xs, ys).statistic), [(xs, ys)]
    if claim.method == "range":
        return float(np.ptp(ys)), None
    return float(np.polyfit(np.log2(xs) if log_axis else xs, ys, 1)[0]), None


def _fitted(
    claim: ClaimSpec,
    curve: list[tuple[float, float | None, bool]],
    readings: list[Reading],
    data: dict,
    log_axis: bool,
) -> SeedOutcome:
    pairs = [(x, y) for x, y, _ in curve if y is not None]
    if len(pairs) < 2:
        return _combine(readings, None, data)
    xs = np.array([p[0] for p in pairs])
    ys = np.array([p[1] for p in pairs])
    found, ranks = _fit(claim, xs, ys, log_axis)
    outcome = _combine(readings, None if found is None else Bounds.exact(found), data)
    if outcome.bounds is not None:
        outcome.ranks = ranks
    return outcome


def _trend_layers(found: PointNumbers, metric: str) -> tuple[list[str], list[str]]:
    """The layers a ``layer_trend`` runs along and the metric path of each: every
    probed layer for ``drift/*`` (``*`` is the layer), the probed layers a glob
    matches for ``drift/blocks.*`` (one dotted part per ``*``), the weight layers a
    glob matches for ``grad_norm/<step>/<glob>`` (``blocks.*.mlp.c_fc``)."""
    parsed = parse_metric(metric)
    inner = parsed.inner if parsed.kind == "log10" and parsed.inner is not None else parsed
    pattern = (inner.layer or "").removesuffix(TRAIN_MODE)
    if inner.kind == "grad_norm":
        layers = [name for name in found.grad_layers() if glob_match(name, pattern)]
    elif pattern == "*":
        layers = found.layers()
    else:
        layers = [name for name in found.layers() if glob_match(name, pattern)]
    return layers, [metric.replace(pattern, name, 1) for name in layers]


def _layer_trend(
    table: PointTable, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int
) -> SeedOutcome:
    found = table.point(claim.network, axes, seed)
    layers, paths = _trend_layers(found, claim.metric) if found is not None else ([], [])
    readings = [found.reading(path) for path in paths] if found is not None else []
    curve = [(float(i), r.value, False) for i, r in enumerate(readings)]
    data = {"curve": {claim.network: curve}, "layers": layers}
    return _fitted(claim, curve, readings, data, False)


def _curve(
    table: PointTable,
    config: ExperimentConfig,
    claim: ClaimSpec,
    network: str,
    axes: dict,
    seed: int,
) -> tuple[list[tuple[float, float | None, bool]], list[Reading]]:
    out, readings = [], []
    assert claim.axis is not None
    for v in config.sweep[claim.axis]:
        point_axes = {**axes, claim.axis: v}
        ordered = {k: point_axes[k] for k in config.sweep if k in point_axes}
        reading = table.reading(network, ordered, seed, claim.metric)
        readings.append(reading)
        out.append((float(v), reading.value, table.diverged(network, ordered, seed)))
    return out, readings


def _trend(
    table: PointTable, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int
) -> SeedOutcome:
    curve, readings = _curve(table, config, claim, claim.network, axes, seed)
    data: dict[str, Any] = {"curve": {claim.network: curve}}
    if claim.baseline is not None:  # the trend of the paired difference
        base, more = _curve(table, config, claim, claim.baseline, axes, seed)
        readings += more
        data["curve"][claim.baseline] = base
        curve = [
            (x, y - yb if y is not None and yb is not None else None, False)
            for (x, y, _), (_, yb, _) in zip(curve, base, strict=True)
        ]
        data["difference"] = curve
    return _fitted(claim, curve, readings, data, claim.log_axis)


def _threshold_of(claim: ClaimSpec, curve: list[tuple[float, float | None, bool]]) -> Bounds:
    """The largest (or smallest) axis value whose run reaches the target without
    diverging, with the grid's resolution as its bounds: the largest lies in
    ``[x_k, x_{k+1})``, the smallest in ``(x_{k-1}, x_k]``; at the grid's edge, or
    where no value trains, the side beyond the grid is open (censored). Values in
    ``log2`` with ``log_axis``."""
    assert claim.target is not None
    target = claim.target

    def reached(y: float) -> bool:
        return y <= target if claim.below else y >= target

    xs = sorted(x for x, _, _ in curve)
    scale = [math.log2(x) if claim.log_axis else x for x in xs]
    ok = [xs.index(x) for x, y, diverged in curve if y is not None and not diverged and reached(y)]
    if claim.pick == "largest":
        if not ok:  # nothing trains: the largest trainable value is below the grid
            return Bounds(scale[0], -math.inf, scale[0])
        k = max(ok)
        return Bounds(scale[k], scale[k], scale[k + 1] if k + 1 < len(xs) else math.inf)
    if not ok:  # nothing trains: the smallest trainable value is above the grid
        return Bounds(scale[-1], scale[-1], math.inf)
    k = min(ok)
    return Bounds(scale[k], scale[k - 1] if k > 0 else -math.inf, scale[k])


def _threshold(
    table: PointTable, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int
) -> SeedOutcome:
    curves, readings = {}, []
    for net in claim.networks:
        curves[net], more = _curve(table, config, claim, net, axes, seed)
        readings += more
    data: dict[str, Any] = {"curve": curves}
    if not any(r.value is not None for r in readings):
        return _combine(readings, None, data)  # nothing of this seed has run
    a = _threshold_of(claim, curves[claim.network])
    data["network"] = a.value
    data["network_bounds"] = [a.lo, a.hi]
    if claim.baseline is None:
        return _combine(readings, a, data)
    b = _threshold_of(claim, curves[claim.baseline])
    data["baseline"] = b.value
    data["baseline_bounds"] = [b.lo, b.hi]
    return _combine(readings, a - b, data)


STATISTICS = {
    "difference": _difference,
    "value": _value,
    "trend": _trend,
    "layer_trend": _layer_trend,
    "threshold": _threshold,
}
