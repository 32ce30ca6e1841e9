"""The battery: every claim of the textbook account of internal covariate shift, one
preset per group, run into one store and judged in one report.

:data:`BATTERY` lists the presets in the order the report shows them. Each has a
``quick`` and a ``full`` size (``[sizes.<name>]`` in its TOML). :func:`plan_battery`
resolves them at one size; the sweep machinery runs what the store does not hold;
:func:`battery_results` judges every claim of every preset and adds the one claim
that spans them (:func:`shift_speed_correlation`): over every pair of a normalized
network and the same network without normalization, does a larger drift reduction
go with a larger speed-up?
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from covshift.experiments.claim_result import ClaimResult
from covshift.experiments.claim_spec import ClaimSpec
from covshift.experiments.config import ConfigError, ExperimentConfig
from covshift.experiments.config_files import load_config
from covshift.experiments.grid import Point
from covshift.experiments.numbers import PointNumbers
from covshift.experiments.scale_check import apply_other_scale
from covshift.experiments.sweep import SweepPlan, plan_sweep

__all__ = [
    "BATTERY",
    "CORRELATION_CLAIM",
    "BatteryPart",
    "attribution_matrix",
    "plan_battery",
    "shift_speed_correlation",
]

BATTERY = (
    "shift-causes",
    "activations",
    "depth",
    "lr-sensitivity",
    "init-sensitivity",
    "ioffe2015",
    "ghost-bn",
    "norm-scopes",
    "santurkar2018",
    "santurkar2018-linear",
    "transformer-norms",
    "norm-placement",
    "transformer-shift",
)

CORRELATION_CLAIM = ClaimSpec(
    id="shift-vs-speed",
    text=(
        "Across the whole battery, less shift goes with faster training: the networks "
        "whose normalization reduces the drift most are those it speeds up most"
    ),
    reading=(
        "Every point of a battery preset with a [battery] target that has a norm is paired "
        "with the point that differs from it only in having none (same seed, same axis "
        "values). For each pair: drift reduction = mean over the probed layers of "
        "(drift without norm - drift with it); speed-up = log2(steps to the target "
        "without norm / steps with it). Primary analysis: the pairs where both networks "
        "reach the target (train), so that neither axis measures 'the unnormalized network "
        "failed'; per preset (stratum), the Spearman correlation over its pairs of every "
        "seed; combined over presets by the mean of Fisher's z = atanh(rho) weighted by "
        "(pairs - 3), so that a correlation between presets (Simpson's paradox) cannot "
        "drive it. Interval: bootstrap over seeds; p: permutation of the speed-ups within "
        "each preset. Secondary (no verdict): every pair, a run that never reaches the "
        "target counted as its length plus one evaluation interval (a lower bound)."
    ),
    statistic="trend",
    method="spearman",
    metric="diverged",
    network="-",
    axis="-",
    rule="greater",
    value=0.0,
    margin_reason=("any positive association counts: the textbook predicts the sign, not a size"),
)

# Pairs a stratum needs for a rank correlation worth combining (Fisher's weight n - 3).
MIN_PAIRS = 4
BOOTSTRAP_DRAWS = 2000
PERMUTATION_DRAWS = 5000


@dataclass(frozen=True)
class BatteryPart:
    """One preset of the battery at one size, planned against the store."""

    preset: str
    config: ExperimentConfig
    plan: SweepPlan

    @property
    def experiment_id(self) -> str:
        return self.plan.experiment_id


def plan_battery(
    size: str,
    store_path: str | Path,
    presets: Sequence[str] = BATTERY,
    overrides: dict[str, Any] | None = None,
) -> list[BatteryPart]:
    """Every battery preset at ``size``, with what the store already holds."""
    parts = []
    for name in presets:
        config = load_config(name, overrides, size=size)
        parts.append(BatteryPart(name, config, plan_sweep(config, store_path)))
    _add_cross_controls(parts, size, store_path, overrides)
    return parts


def _add_cross_controls(
    parts: list[BatteryPart],
    size: str,
    store_path: str | Path,
    overrides: dict[str, Any] | None,
) -> None:
    """A control written ``<preset>:<id>`` names a check of a battery preset; it is
    planned too (a control is run beside the claim it guards)."""
    planned = {p.preset: p.config for p in parts}
    for part in list(parts):
        for claim in part.config.claims:
            for control in claim.controls:
                if ":" not in control:
                    continue
                preset, _, check = control.partition(":")
                if preset not in BATTERY:
                    raise ConfigError(
                        f"{part.preset}: claim {claim.id!r} names the control {control!r}, but "
                        f"{preset!r} is not a battery preset; battery: {', '.join(BATTERY)}"
                    )
                config = planned.get(preset) or load_config(preset, overrides, size=size)
                checks = [c.id for c in config.claims if c.kind == "check"]
                if check not in checks:
                    raise ConfigError(
                        f"{part.preset}: claim {claim.id!r} names the control {control!r}, but "
                        f"{preset} has no check {check!r}; its checks: {', '.join(checks)}"
                    )
                if preset not in planned:  # run the control beside the claim
                    planned[preset] = config
                    parts.append(BatteryPart(preset, config, plan_sweep(config, store_path)))


def _mean_drift(numbers: PointNumbers, layers: list[str], scale: str = "drift") -> float | None:
    """The mean over ``layers`` of their drift (``scale``: ``"drift"``, each unit's own
    width, or ``"drift_layer"``, the layer's first-record width); None if one is
    missing or not measurable."""
    if scale == "drift":
        values = [numbers.drift.get(layer) for layer in layers]
    else:
        figures = [numbers.figures.get((scale, layer)) for layer in layers]
        values = [f.value if f is not None and f.measurable else None for f in figures]
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))  # type: ignore[arg-type]


def _pair_key(point: Point) -> str:
    """What a normalized point and its unnormalized twin share: the whole spec but
    the norm and its settings."""
    model = point.spec.model.model_dump(mode="json", exclude={"norm", "norm_kwargs"})
    rest = point.spec.model_dump(mode="json", exclude={"model"})
    return repr((sorted(rest.items()), sorted((k, repr(v)) for k, v in model.items())))


def battery_pairs(
    config: ExperimentConfig, points: Sequence[Point], numbers: dict[str, PointNumbers]
) -> list[dict[str, Any]]:
    """The (norm, no norm) pairs of one experiment, with drift reduction and speed-up."""
    spec = config.battery
    if spec is None or spec.target is None:
        return []
    points = [p for p in points if all(p.axes.get(k) == v for k, v in spec.where.items())]
    bare = {_pair_key(p): p for p in points if p.spec.model.norm == "none"}
    lower = spec.metric.endswith("_loss")
    out = []
    for p in points:
        twin = bare.get(_pair_key(p)) if p.spec.model.norm != "none" else None
        if twin is None:
            continue
        a, b = numbers[p.id], numbers[twin.id]
        if not (a.complete and b.complete):
            continue
        layers = [x for x in b.layers() if x in a.drift]
        d_norm, d_bare = _mean_drift(a, layers), _mean_drift(b, layers)
        metric = f"steps_to/{spec.metric}/{spec.target}"
        reached = a.value(metric), b.value(metric)
        if d_norm is None or d_bare is None or reached == (None, None):
            continue
        l_norm, l_bare = (_mean_drift(n, layers, "drift_layer") for n in (a, b))
        censor = float(p.spec.steps + p.spec.eval_every)
        t_norm, t_bare = (censor if r is None else max(r, 1.0) for r in reached)
        out.append(
            {
                "experiment": config.name,
                "point": p.name,
                "twin": twin.name,
                "seed": p.seed,
                "norm": p.spec.model.norm,
                "drift_reduction": d_bare - d_norm,
                "drift_reduction_layer": (
                    None if l_norm is None or l_bare is None else l_bare - l_norm
                ),
                "speedup": math.log2(t_bare / t_norm),
                "censored": [reached[0] is None, reached[1] is None],
                "lower_is_better": lower,
            }
        )
    return out


def _rho(pairs: Sequence[dict[str, Any]]) -> float | None:
    xs = np.array([p["drift_reduction"] for p in pairs])
    ys = np.array([p["speedup"] for p in pairs])
    if len(pairs) < MIN_PAIRS or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    return float(scipy_stats.spearmanr(xs, ys).statistic)


def _why_no_rho(pairs: Sequence[dict[str, Any]]) -> str:
    """Why a stratum has no rank correlation, in words."""
    if len(pairs) < MIN_PAIRS:
        return f"{len(pairs)} pairs (a correlation needs {MIN_PAIRS})"
    speedups = {p["speedup"] for p in pairs}
    if len(speedups) == 1:
        return (
            f"{len(pairs)} pairs, every speed-up {next(iter(speedups)):+g} (both networks "
            "of every pair reach the target at the same evaluation)"
        )
    return f"{len(pairs)} pairs, every drift reduction the same"


def _combined(strata: dict[str, list[dict[str, Any]]]) -> float | None:
    """``tanh`` of the (n - 3)-weighted mean of ``atanh(rho)`` over the strata that
    have a correlation."""
    z, w = [], []
    for pairs in strata.values():
        rho = _rho(pairs)
        if rho is not None:
            z.append(math.atanh(max(-0.999999, min(0.999999, rho))))
            w.append(len(pairs) - 3)
    if not w:
        return None
    return math.tanh(float(np.average(z, weights=w)))


def _by(pairs: Sequence[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for p in pairs:
        out.setdefault(p[key], []).append(p)
    return out


def _bootstrap(pairs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> tuple[float, float] | None:
    """Percentile 95% interval of the combined correlation over seeds drawn with
    replacement (a seed's pairs stay together: the seed is the replicate)."""
    by_seed = _by(pairs, "seed")
    present = [s for s in seeds if s in by_seed]
    if len(present) < 2:
        return None
    rng = np.random.default_rng(2018)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        chosen = rng.choice(len(present), size=len(present), replace=True)
        sample = [p for i in chosen for p in by_seed[present[i]]]
        value = _combined(_by(sample, "experiment"))
        if value is not None:
            draws.append(value)
    if len(draws) < BOOTSTRAP_DRAWS // 2:
        return None
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _permutation_p(pairs: Sequence[dict[str, Any]], observed: float) -> tuple[float, float]:
    """p of a combined correlation this far above / below 0 when the speed-ups are
    shuffled within each stratum (no association inside any preset)."""
    rng = np.random.default_rng(2019)
    strata = _by(pairs, "experiment")
    above = below = 0
    for _ in range(PERMUTATION_DRAWS):
        shuffled = {}
        for name, group in strata.items():
            speeds = rng.permutation([p["speedup"] for p in group])
            shuffled[name] = [
                {**p, "speedup": float(v)} for p, v in zip(group, speeds, strict=True)
            ]
        value = _combined(shuffled)
        if value is None:
            continue
        above += value >= observed - 1e-12
        below += value <= observed + 1e-12
    return (1 + above) / (1 + PERMUTATION_DRAWS), (1 + below) / (1 + PERMUTATION_DRAWS)


def _correlation_result(
    name: str, pairs: Sequence[dict[str, Any]], seeds: Sequence[int], all_pairs: int
) -> ClaimResult:
    from covshift.experiments.claims import claim_result
    from covshift.experiments.verdicts import decide_unadjusted

    where = {"preset": name}
    result = claim_result(CORRELATION_CLAIM, 0, "battery", where, len(seeds))
    result.statistic = "correlation"
    result.extra["statistic_text"] = (
        "Spearman correlation of the drift reduction with the log2 speed-up to the target, "
        "over the (norm, no norm) pairs in which both networks reach it"
        + (", per preset, Fisher-combined over presets" if name.startswith("all") else "")
    )
    result.interval_method = (
        "Spearman correlation over the pairs of every seed, per preset, combined over "
        "presets by Fisher's z weighted by (pairs - 3); 95% percentile interval of "
        f"{BOOTSTRAP_DRAWS:,} bootstrap draws of the seeds; p from {PERMUTATION_DRAWS:,} "
        "permutations of the speed-ups within each preset"
    )
    strata = _by(pairs, "experiment")
    estimate = _combined(strata)
    per_seed = {
        str(s): _combined(_by(group, "experiment")) for s, group in _by(pairs, "seed").items()
    }
    result.per_seed = {s: v for s, v in per_seed.items() if v is not None}
    result.seeds = len(result.per_seed)
    result.extra["pairs"] = list(pairs)
    result.extra["strata"] = {
        k: {"pairs": len(v), "rho": _rho(v)} for k, v in sorted(strata.items())
    }
    result.extra["pairs_total"] = all_pairs
    result.data = {str(s): {"pairs": len(v)} for s, v in _by(pairs, "seed").items()}
    if estimate is None:
        result.verdict = result.verdict_unadjusted = "not measured"
        why = "; ".join(f"{k}: {_why_no_rho(v)}" for k, v in sorted(strata.items()))
        result.reason = (
            f"no preset has {MIN_PAIRS} or more pairs in which both networks reach the target "
            f"with speed-ups and drift reductions that vary ({len(pairs)} such pairs of "
            f"{all_pairs}{'; ' + why if why else ''})"
        )
        return result
    result.estimate = estimate
    interval = _bootstrap(pairs, seeds)
    result.interval = list(interval) if interval is not None else None
    if interval is None:
        result.verdict = result.verdict_unadjusted = "inconclusive"
        result.reason = "fewer than two seeds with pairs: no interval"
        return result
    up, down = _permutation_p(pairs, estimate)
    result.p_value, result.p_contradict = up, down
    result.extra["p_method"] = f"permutation within presets ({PERMUTATION_DRAWS:,} draws)"
    return decide_unadjusted(result)


def shift_speed_correlation(
    pairs: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> list[ClaimResult]:
    """The battery's across-experiment claim (module docstring, :data:`CORRELATION_CLAIM`):
    the combined result over every preset first, then one per preset (stratum), all on
    the pairs where both networks train; the secondary analysis over every pair is in
    the combined result's ``secondary``. Each is judged in both of the drift's scales
    and decided only where they agree (:mod:`covshift.experiments.scale_check`): the
    drift reduction in units of each unit's width, and in units of each layer's
    first-record width (``other_scale``)."""
    # Both scales read the same pairs: a pair whose layer-scale reduction could not be
    # measured leaves both. Pairs without the field at all (made before it existed, or
    # by hand) are judged in the unit scale alone.
    scaled = [p for p in pairs if "drift_reduction_layer" in p]
    if not scaled:
        return _stratified_correlations(pairs, seeds)
    both = [p for p in scaled if p["drift_reduction_layer"] is not None]
    results = _stratified_correlations(both, seeds)
    in_layer_scale = [{**p, "drift_reduction": p["drift_reduction_layer"]} for p in both]
    twins = {r.slice_text: r for r in _stratified_correlations(in_layer_scale, seeds)}
    for result in results:
        twin = twins[result.slice_text]  # the same pairs, so the same strata
        if result.verdict != "not measured":
            twin.metric = "drift_layer/mean"
            apply_other_scale(result, twin)
    return results


def _stratified_correlations(
    pairs: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> list[ClaimResult]:
    """The combined correlation and one per preset, in one scale (``drift_reduction``)."""
    trained = [p for p in pairs if not any(p["censored"])]
    combined = _correlation_result("all presets (stratified)", trained, seeds, len(pairs))
    secondary = _by(pairs, "experiment")
    combined.extra["secondary"] = {
        "pairs": len(pairs),
        "rho": _combined(secondary),
        "strata": {k: {"pairs": len(v), "rho": _rho(v)} for k, v in sorted(secondary.items())},
        "note": "every pair, censored times as lower bounds; descriptive, no verdict",
    }
    results = [combined]
    for name, group in sorted(_by(trained, "experiment").items()):
        results.append(_correlation_result(name, group, seeds, len(pairs)))
    return results


def attribution_matrix(
    config: ExperimentConfig, points: Sequence[Point], numbers: dict[str, PointNumbers]
) -> dict[str, Any] | None:
    """For an experiment whose networks freeze layers: the share of each probed layer's
    drift that disappears when a network's frozen layers do not train,
    ``1 - drift(frozen) / drift(all training)`` per seed, averaged over seeds; rows are
    the networks with a ``freeze``, columns the probed layers. None without such
    networks or without the network that freezes nothing."""
    full = [k for k, n in config.networks.items() if not n.resolve(config.model).freeze]
    frozen = [k for k, n in config.networks.items() if n.resolve(config.model).freeze]
    if not full or not frozen:
        return None
    by = {(p.network, p.seed): numbers[p.id] for p in points if not p.axes}
    layers: list[str] = []
    for seed in config.seeds:
        found = by.get((full[0], seed))
        if found is not None and found.run is not None:
            layers = found.layers()
            break
    rows = []
    for net in frozen:
        row = []
        for layer in layers:
            shares = []
            for seed in config.seeds:
                a, b = by.get((net, seed)), by.get((full[0], seed))
                if a is None or b is None:
                    continue
                da, db = a.drift.get(layer), b.drift.get(layer)
                if da is not None and db:
                    shares.append(1.0 - da / db)
            row.append(float(np.mean(shares)) if shares else None)
        rows.append(row)
    return {
        "reference": full[0],
        "networks": frozen,
        "labels": [config.networks[k].label for k in frozen],
        "freeze": [list(config.networks[k].resolve(config.model).freeze) for k in frozen],
        "layers": layers,
        "share_removed": rows,
    }
