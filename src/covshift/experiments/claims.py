"""Judging claims: a statistic per seed, its 95% interval over seeds, a verdict.

For each claim of a preset (:mod:`covshift.experiments.claim_spec`) and each slice of
the axes it leaves free, the statistic is computed once per seed from the points of
that seed (the networks of one seed share initial weights and batches, so a
difference is paired). The estimate is the mean over the seeds that have a value;
its 95% interval is Student's t interval, ``mean ± t(0.975, n-1) s / sqrt(n)`` with
the sample standard deviation ``s`` of the ``n`` per-seed values. With one seed
there is no interval and the verdict is ``inconclusive``; with none, ``not measured``.
The rule is applied to the interval as written in the preset.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from covshift.experiments.claim_spec import ClaimSpec, rule_text
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import Point, format_axes
from covshift.experiments.metrics import parse_metric
from covshift.experiments.numbers import PointNumbers

__all__ = ["INTERVAL_METHOD", "evaluate_claims", "t_interval", "verdict"]

INTERVAL_METHOD = (
    "mean over seeds of the per-seed statistic (paired by seed); 95% Student t interval "
    "with n-1 degrees of freedom"
)


def t_interval(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean and 95% Student t interval of ``values`` (no interval for fewer than 2)."""
    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean())
    if len(a) < 2:
        return mean, None
    half = float(scipy_stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return mean, (mean - half, mean + half)


def verdict(claim: ClaimSpec, interval: tuple[float, float] | None, n: int) -> tuple[str, str]:
    """``(verdict, reason)`` of ``claim`` for a 95% interval over ``n`` seeds."""
    if n == 0:
        return "not measured", "no seed has a value"
    if interval is None:
        return "inconclusive", "one seed: no interval"
    lo, hi = interval
    v, m = claim.value, claim.margin
    supported, contradicted = {
        "greater": (lo > v, hi < v),
        "less": (hi < v, lo > v),
        "not_less": (lo >= v - m, hi < v - m),
        "not_greater": (hi <= v + m, lo > v + m),
        "within": (v - m <= lo and hi <= v + m, hi < v - m or lo > v + m),
    }[claim.rule]
    if supported:
        return "supported", f"the interval [{lo:.4g}, {hi:.4g}] meets the rule"
    if contradicted:
        return "contradicted", f"the interval [{lo:.4g}, {hi:.4g}] is on the other side"
    return "inconclusive", f"the interval [{lo:.4g}, {hi:.4g}] straddles the rule's bound"


def _key(network: str, axes: dict[str, Any], seed: int) -> tuple[Any, ...]:
    return (network, tuple(sorted(axes.items())), seed)


class _Grid:
    """Points and their numbers, looked up by network, axis values and seed."""

    def __init__(self, points: Sequence[Point], numbers: dict[str, PointNumbers]) -> None:
        self.numbers = {_key(p.network, p.axes, p.seed): numbers[p.id] for p in points}

    def value(self, network: str, axes: dict[str, Any], seed: int, metric: str) -> float | None:
        found = self.numbers.get(_key(network, axes, seed))
        return found.value(metric) if found is not None else None

    def diverged(self, network: str, axes: dict[str, Any], seed: int) -> bool:
        found = self.numbers.get(_key(network, axes, seed))
        return found is not None and found.diverged


def _slices(config: ExperimentConfig, claim: ClaimSpec) -> list[dict[str, Any]]:
    free = [k for k in config.sweep if k not in claim.where and k != claim.axis]
    return [
        dict(zip(free, combo, strict=True))
        for combo in itertools.product(*(config.sweep[k] for k in free))
    ]


def _axes(config: ExperimentConfig, claim: ClaimSpec, where: dict[str, Any]) -> dict[str, Any]:
    """Axis values of a point in this slice, in the grid's key order (axis excluded)."""
    fixed = {**claim.where, **where}
    return {k: fixed[k] for k in config.sweep if k in fixed}


def _difference(grid: _Grid, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int):
    b_axes = {k: claim.baseline_where.get(k, v) for k, v in axes.items()}
    if claim.interaction:  # [net - base] at where, minus the same at baseline_where
        assert claim.baseline is not None
        gaps = []
        for at in (axes, b_axes):
            x = grid.value(claim.network, at, seed, claim.metric)
            y = grid.value(claim.baseline, at, seed, claim.baseline_metric or claim.metric)
            gaps.append(x - y if x is not None and y is not None else None)
        a, b = gaps
    else:
        a = grid.value(claim.network, axes, seed, claim.metric)
        b_net = claim.baseline or claim.network
        b = grid.value(b_net, b_axes, seed, claim.baseline_metric or claim.metric)
    data = {"network": a, "baseline": b}
    return (a - b if a is not None and b is not None else None), data


def _value(grid: _Grid, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int):
    a = grid.value(claim.network, axes, seed, claim.metric)
    return a, {"network": a}


def _fit(claim: ClaimSpec, xs: np.ndarray, ys: np.ndarray, log_axis: bool) -> float | None:
    if claim.method == "spearman":
        if np.ptp(ys) == 0 or np.ptp(xs) == 0:
            return None
        return float(scipy_stats.spearmanr(xs, ys).statistic)
    return float(np.polyfit(np.log2(xs) if log_axis else xs, ys, 1)[0])


def _layer_trend(grid: _Grid, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int):
    found = grid.numbers.get(_key(claim.network, axes, seed))
    layers = found.layers() if found is not None else []
    curve = (
        [
            (float(i), found.value(claim.metric.replace("*", layer)), False)
            for i, layer in enumerate(layers)
        ]
        if found is not None
        else []
    )
    data = {"curve": {claim.network: curve}, "layers": layers}
    pairs = [(x, y) for x, y, _ in curve if y is not None]
    if len(pairs) < 2:
        return None, data
    return _fit(
        claim, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]), False
    ), data


def _curve(
    grid: _Grid, config: ExperimentConfig, claim: ClaimSpec, network: str, axes: dict, seed: int
) -> list[tuple[float, float | None, bool]]:
    out = []
    assert claim.axis is not None
    for v in config.sweep[claim.axis]:
        point_axes = {**axes, claim.axis: v}
        ordered = {k: point_axes[k] for k in config.sweep if k in point_axes}
        out.append(
            (
                float(v),
                grid.value(network, ordered, seed, claim.metric),
                grid.diverged(network, ordered, seed),
            )
        )
    return out


def _trend(grid: _Grid, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int):
    curve = _curve(grid, config, claim, claim.network, axes, seed)
    data: dict[str, Any] = {"curve": {claim.network: curve}}
    if claim.baseline is not None:  # the trend of the paired difference
        base = _curve(grid, config, claim, claim.baseline, axes, seed)
        data["curve"][claim.baseline] = base
        curve = [
            (x, y - yb if y is not None and yb is not None else None, False)
            for (x, y, _), (_, yb, _) in zip(curve, base, strict=True)
        ]
        data["difference"] = curve
    pairs = [(x, y) for x, y, _ in curve if y is not None]
    if len(pairs) < 2:
        return None, data
    xs = np.array([p[0] for p in pairs])
    ys = np.array([p[1] for p in pairs])
    return _fit(claim, xs, ys, claim.log_axis), data


def _threshold_of(claim: ClaimSpec, curve: list[tuple[float, float | None, bool]]) -> float | None:
    assert claim.target is not None
    target = claim.target

    def reached(y: float) -> bool:
        return y <= target if claim.below else y >= target

    ok = [x for x, y, diverged in curve if y is not None and not diverged and reached(y)]
    if not ok:
        return None
    x = max(ok) if claim.pick == "largest" else min(ok)
    return math.log2(x) if claim.log_axis else x


def _threshold(grid: _Grid, config: ExperimentConfig, claim: ClaimSpec, axes: dict, seed: int):
    curves = {net: _curve(grid, config, claim, net, axes, seed) for net in claim.networks}
    data: dict[str, Any] = {"curve": curves}
    a = _threshold_of(claim, curves[claim.network])
    data["network"] = a
    if claim.baseline is None:
        return a, data
    b = _threshold_of(claim, curves[claim.baseline])
    data["baseline"] = b
    return (a - b if a is not None and b is not None else None), data


_STATISTICS = {
    "difference": _difference,
    "value": _value,
    "trend": _trend,
    "layer_trend": _layer_trend,
    "threshold": _threshold,
}


def _why_not_measured(
    claim: ClaimSpec, points: Sequence[Point], numbers: dict[str, PointNumbers]
) -> str:
    """Why no seed has a value: points not run yet, or a step past their end."""
    mine = [p for p in points if p.network in claim.networks]
    if not any(numbers[p.id].run is not None for p in mine):
        return "no seed has a value: the claim's points have not been run"
    longest = max(p.spec.steps for p in mine)
    for path in (claim.metric, claim.baseline_metric):
        metric = parse_metric(path) if path else None
        if metric is not None and isinstance(metric.when, int) and metric.when > longest:
            return f"no seed has a value of {path}: the points train {longest} steps"
    return f"no seed has a value of {claim.metric}"


def evaluate_claims(
    config: ExperimentConfig,
    experiment_id: str,
    points: Sequence[Point],
    numbers: dict[str, PointNumbers],
) -> list[dict[str, Any]]:
    """One result per claim and slice (see the module docstring), JSON-ready."""
    grid = _Grid(points, numbers)
    results = []
    for index, claim in enumerate(config.claims):
        for where in _slices(config, claim):
            axes = _axes(config, claim, where)
            per_seed: dict[str, float] = {}
            data: dict[str, Any] = {}
            for seed in config.seeds:
                value, seed_data = _STATISTICS[claim.statistic](grid, config, claim, axes, seed)
                data[str(seed)] = seed_data
                if value is not None and math.isfinite(value):
                    per_seed[str(seed)] = value
            values = list(per_seed.values())
            estimate, interval = t_interval(values) if values else (None, None)
            outcome, reason = verdict(claim, interval, len(values))
            if not values:
                reason = _why_not_measured(claim, points, numbers)
            results.append(
                {
                    "id": claim.id or f"claim-{index + 1}",
                    "index": index,
                    "text": claim.text,
                    "reading": claim.reading,
                    "experiment": experiment_id,
                    "statistic": claim.statistic,
                    "metric": claim.metric,
                    "baseline_metric": claim.baseline_metric,
                    "network": claim.network,
                    "baseline": claim.baseline,
                    "axis": claim.axis,
                    "method": claim.method if "trend" in claim.statistic else None,
                    "target": claim.target,
                    "pick": claim.pick if claim.statistic == "threshold" else None,
                    "below": claim.below,
                    "log_axis": claim.log_axis,
                    "where": {**claim.where},
                    "baseline_where": {**claim.baseline_where},
                    "interaction": claim.interaction,
                    "slice": where,
                    "slice_text": format_axes(where),
                    "estimate": estimate,
                    "interval": list(interval) if interval is not None else None,
                    "seeds": len(values),
                    "seeds_total": len(config.seeds),
                    "per_seed": per_seed,
                    "data": data,
                    "interval_method": INTERVAL_METHOD,
                    "rule": claim.rule,
                    "value": claim.value,
                    "margin": claim.margin,
                    "rule_text": rule_text(claim),
                    "verdict": outcome,
                    "reason": reason,
                }
            )
    return results
