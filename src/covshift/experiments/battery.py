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

from covshift.experiments.claim_spec import ClaimSpec, rule_text
from covshift.experiments.claims import INTERVAL_METHOD, t_interval, verdict
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.config_files import load_config
from covshift.experiments.grid import Point
from covshift.experiments.numbers import PointNumbers
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
    "norm-scopes",
    "santurkar2018",
    "santurkar2018-linear",
)

CORRELATION_CLAIM = {
    "id": "shift-vs-speed",
    "text": (
        "Across the whole battery, less shift goes with faster training: the networks "
        "whose normalization reduces the drift most are those it speeds up most"
    ),
    "reading": (
        "Every point of a battery preset with a [battery] target that has a norm is paired "
        "with the point that differs from it only in having none (same seed, same axis "
        "values). For each pair: drift reduction = mean over the probed layers of "
        "(drift without norm - drift with it); speed-up = log2(steps to the target "
        "without norm / steps with it), where a run that never reaches the target (or "
        "diverges) counts as its length plus one evaluation interval, a lower bound; pairs "
        "where neither reaches it are left out. Per seed: the Spearman correlation over "
        "all pairs of all presets; the textbook account predicts it positive."
    ),
    "rule": "greater",
    "value": 0.0,
    "margin": 0.0,
}


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
    return parts


def _mean_drift(numbers: PointNumbers, layers: list[str]) -> float | None:
    values = [numbers.drift.get(layer) for layer in layers]
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
    bare = {_pair_key(p): p for p in points if p.spec.model.norm == "none"}
    lower = spec.metric.endswith("_loss")
    out = []
    for p in points:
        twin = bare.get(_pair_key(p)) if p.spec.model.norm != "none" else None
        if twin is None:
            continue
        a, b = numbers[p.id], numbers[twin.id]
        if a.run is None or b.run is None:
            continue
        layers = [x for x in b.layers() if x in a.drift]
        d_norm, d_bare = _mean_drift(a, layers), _mean_drift(b, layers)
        metric = f"steps_to/{spec.metric}/{spec.target}"
        reached = a.value(metric), b.value(metric)
        if d_norm is None or d_bare is None or reached == (None, None):
            continue
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
                "speedup": math.log2(t_bare / t_norm),
                "censored": [reached[0] is None, reached[1] is None],
                "lower_is_better": lower,
            }
        )
    return out


def shift_speed_correlation(pairs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict:
    """The battery's across-experiment claim, as a claim result (see the module
    docstring and :data:`CORRELATION_CLAIM`)."""
    per_seed: dict[str, float] = {}
    data: dict[str, Any] = {}
    for seed in seeds:
        mine = [p for p in pairs if p["seed"] == seed]
        data[str(seed)] = {"pairs": len(mine)}
        xs = np.array([p["drift_reduction"] for p in mine])
        ys = np.array([p["speedup"] for p in mine])
        if len(mine) >= 4 and np.ptp(xs) > 0 and np.ptp(ys) > 0:
            per_seed[str(seed)] = float(scipy_stats.spearmanr(xs, ys).statistic)
    values = list(per_seed.values())
    estimate, interval = t_interval(values) if values else (None, None)
    rule = ClaimSpec(
        text=CORRELATION_CLAIM["text"],
        metric="diverged",
        network="-",
        baseline_metric="diverged",
        rule="greater",
        value=0.0,
    )
    outcome, reason = verdict(rule, interval, len(values))
    if not values:
        reason = "fewer than 4 pairs per seed with a drift and a time to target"
    return {
        **CORRELATION_CLAIM,
        "index": 0,
        "experiment": "battery",
        "statistic": "correlation",
        "statistic_text": (
            "Spearman correlation, over all (norm, no norm) pairs of one seed, of the drift "
            "reduction with the log2 speed-up to the target"
        ),
        "metric": "drift reduction vs log2 speed-up",
        "baseline_metric": None,
        "network": None,
        "baseline": None,
        "axis": None,
        "method": "spearman",
        "target": None,
        "pick": None,
        "below": False,
        "log_axis": False,
        "where": {},
        "baseline_where": {},
        "interaction": False,
        "slice": {},
        "slice_text": "",
        "estimate": estimate,
        "interval": list(interval) if interval is not None else None,
        "seeds": len(values),
        "seeds_total": len(seeds),
        "per_seed": per_seed,
        "data": data,
        "pairs": list(pairs),
        "interval_method": INTERVAL_METHOD,
        "rule_text": rule_text(rule),
        "verdict": outcome,
        "reason": reason,
    }


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
