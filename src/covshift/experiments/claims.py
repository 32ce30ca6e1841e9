"""Judging claims: a statistic per seed, its 95% interval over seeds, a verdict.

For each claim of a preset (:mod:`covshift.experiments.claim_spec`) and each slice of
the axes it leaves free, the statistic is computed once per seed from the points of
that seed (:mod:`covshift.experiments.claim_statistics`; the networks of one seed
share initial weights and batches, so a difference is paired). The estimate is the
mean over the seeds that have a value; its 95% interval is Student's t interval over
the seeds, widened where a seed's value is known only to a resolution or as a bound
(:mod:`covshift.experiments.significance`). The verdict comes from one-sided p-values
against the rule, adjusted over the preset's hypotheses (Holm), and from its checks
(:mod:`covshift.experiments.verdicts`); a drift hypothesis is decided only where both of
the drift's scales agree (:mod:`covshift.experiments.scale_check`). With one seed there
is no interval and the verdict is ``inconclusive``; with none, ``not measured``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from covshift.experiments.claim_result import ClaimResult
from covshift.experiments.claim_spec import ClaimSpec, rule_text
from covshift.experiments.claim_statistics import STATISTICS, PointTable, SeedOutcome
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import Point, format_axes
from covshift.experiments.metric_paths import parse_metric
from covshift.experiments.numbers import PointNumbers
from covshift.experiments.scale_check import apply_other_scale, scale_twin
from covshift.experiments.verdicts import judge, judge_family

__all__ = ["INTERVAL_METHOD", "claim_result", "evaluate_claims", "t_interval"]

INTERVAL_METHOD = (
    "mean over seeds of the per-seed statistic (paired by seed); 95% Student t interval "
    "with n-1 degrees of freedom, of the per-seed lower bounds below and upper bounds "
    "above where a seed is known only to a resolution or as a censored bound"
)


def t_interval(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean and 95% Student t interval of ``values`` (no interval for fewer than 2)."""
    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean())
    if len(a) < 2:
        return mean, None
    half = float(scipy_stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return mean, (mean - half, mean + half)


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


def _why_not_measured(
    claim: ClaimSpec, points: Sequence[Point], numbers: dict[str, PointNumbers]
) -> str:
    """Why no seed has a value: points not run yet, or a step past their end."""
    mine = [p for p in points if p.network in claim.networks]
    if not any(numbers[p.id].run is not None for p in mine):
        return "no seed has a value: the claim's points have not been run"
    if not any(numbers[p.id].complete for p in mine):
        open_runs = Counter(numbers[p.id].status for p in mine if numbers[p.id].run is not None)
        states = ", ".join(f"{n} {status}" for status, n in sorted(open_runs.items()))
        return (
            f"no seed has a value: none of the claim's points has finished ({states}); "
            "the command that recorded them resumes them"
        )
    longest = max(p.spec.steps for p in mine)
    for path in (claim.metric, claim.baseline_metric):
        metric = parse_metric(path) if path else None
        if metric is not None and isinstance(metric.when, int) and metric.when > longest:
            return f"no seed has a value of {path}: the points train {longest} steps"
    return f"no seed has a value of {claim.metric}"


def claim_result(
    claim: ClaimSpec, index: int, experiment_id: str, where: dict[str, Any], seeds_total: int
) -> ClaimResult:
    """The result object of one claim and slice, before anything is measured."""
    return ClaimResult(
        id=claim.id or f"claim-{index + 1}",
        index=index,
        text=claim.text,
        reading=claim.reading,
        experiment=experiment_id,
        kind=claim.kind,
        statistic=claim.statistic,
        metric=claim.metric,
        baseline_metric=claim.baseline_metric,
        network=claim.network,
        baseline=claim.baseline,
        axis=claim.axis,
        method=claim.method if "trend" in claim.statistic else None,
        target=claim.target,
        pick=claim.pick if claim.statistic == "threshold" else None,
        below=claim.below,
        log_axis=claim.log_axis,
        where={**claim.where},
        baseline_where={**claim.baseline_where},
        interaction=claim.interaction,
        slice=where,
        slice_text=format_axes(where),
        rule=claim.rule,
        value=claim.value,
        margin=claim.margin,
        margin_reason=claim.margin_reason,
        rule_text=rule_text(claim),
        interval_method=INTERVAL_METHOD,
        controls=list(claim.controls),
        guards=claim.guards if claim.kind == "check" else None,
        seeds_total=seeds_total,
    )


def _judge_one(
    table: PointTable,
    config: ExperimentConfig,
    claim: ClaimSpec,
    index: int,
    experiment_id: str,
    where: dict[str, Any],
    axes: dict[str, Any],
) -> ClaimResult:
    """One claim at one slice: its statistic per seed, then :func:`judge`."""
    outcomes: dict[str, SeedOutcome] = {}
    for seed in config.seeds:
        outcome = STATISTICS[claim.statistic](table, config, claim, axes, seed)
        bounds = outcome.bounds
        if bounds is not None and not math.isfinite(bounds.value):
            outcome.bounds = None  # a statistic that is not a number is no value
        outcomes[str(seed)] = outcome
    return judge(
        claim_result(claim, index, experiment_id, where, len(config.seeds)), outcomes, claim
    )


def judge_claims(
    config: ExperimentConfig,
    experiment_id: str,
    points: Sequence[Point],
    numbers: dict[str, PointNumbers],
) -> list[ClaimResult]:
    """Every claim and slice of one experiment, judged as one family."""
    table = PointTable(points, numbers)
    results = []
    for index, claim in enumerate(config.claims):
        for where in _slices(config, claim):
            axes = _axes(config, claim, where)
            result = _judge_one(table, config, claim, index, experiment_id, where, axes)
            if result.verdict == "not measured":
                result.reason = _why_not_measured(claim, points, numbers)
            twin = scale_twin(claim)
            if twin is not None and result.verdict != "not measured":
                other = _judge_one(table, config, twin, index, experiment_id, where, axes)
                apply_other_scale(result, other)
            results.append(result)
    judge_family(results)
    return results


def evaluate_claims(
    config: ExperimentConfig,
    experiment_id: str,
    points: Sequence[Point],
    numbers: dict[str, PointNumbers],
) -> list[dict[str, Any]]:
    """One result per claim and slice (see the module docstring), JSON-ready."""
    return [r.to_json() for r in judge_claims(config, experiment_id, points, numbers)]
