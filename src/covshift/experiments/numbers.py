"""A point's numbers, read from the store: series, drift, and any metric path.

:class:`PointNumbers` loads what one run recorded once and answers every metric path
of :mod:`covshift.experiments.metric_paths` from it; the headline numbers of tables, the
CSV and the claims all come from here, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from covshift.experiments.metric_paths import (
    FLOOR,
    SERIES,
    SMOOTHNESS,
    TRAIN_MODE,
    MetricPath,
    parse_metric,
)
from covshift.experiments.significance import Bounds
from covshift.probe.batch_fluctuation import BATCH_STATS
from covshift.probe.figures import (
    Figure,
    drift_figure,
    floor_figure,
    fluctuation_figure,
    relative_gradient_ics,
)
from covshift.probe.layer_gradients import GRAD_NORM_STAT
from covshift.probe.select import glob_match
from covshift.store import RunInfo, Store

__all__ = ["COMPLETE_STATUSES", "PointNumbers", "Reading", "load_numbers", "probed_layers"]

# The statuses of a run that has ended as planned (PointNumbers.complete).
COMPLETE_STATUSES = ("finished", "diverged")
MEAN = "mean"  # drift/mean, drift/mean:<glob>: the mean over probed layers
SMOOTHNESS_LAYER = "(model)"  # the layer name of smoothness records (SmoothnessMonitor)
MEASURED = {"grad_ics_cos", "grad_ics_l2", *SMOOTHNESS, *BATCH_STATS.values()}
RELATIVE_ICS = "grad_ics_rel"  # ||G - G'|| / ||G||, from grad_ics_l2 and grad_norm


def _quiet() -> np.errstate:
    """A diverged run's records hold inf and NaN: what they make is not finite, and is
    reported as not measured (None), so numpy's warnings about it would say nothing."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def _figure_name(m: MetricPath) -> str:
    """The key of a drift, fluctuation or floor in :attr:`PointNumbers.figures`:
    ``drift_layer``, ``fluct_layer`` and ``floor_layer`` for the layer scale."""
    return f"{m.kind}_layer" if m.scale == "layer" else m.kind


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@dataclass(frozen=True)
class Reading:
    """A metric of one point: its value with the bounds it is known within
    (:class:`~covshift.experiments.significance.Bounds`), or None; ``reason`` says why
    a metric that exists could not be measured honestly (degenerate units), and
    ``excluded`` / ``units`` count the units a drift left out and had."""

    bounds: Bounds | None
    reason: str | None = None
    excluded: int = 0
    units: int = 0

    @property
    def value(self) -> float | None:
        return None if self.bounds is None else self.bounds.value


@dataclass
class PointNumbers:
    """What one point's run recorded (None when the point has no run yet)."""

    run: RunInfo | None
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    drift: dict[str, float | None] = field(default_factory=dict)
    floor: dict[str, float | None] = field(default_factory=dict)
    # (layer, stored stat) -> mean over measurements, for gradient ICS and smoothness
    measures: dict[tuple[str, str], float | None] = field(default_factory=dict)
    planned: tuple[int, int] | None = None  # (steps, eval_every) of the point
    fluct: dict[str, float | None] = field(default_factory=dict)
    # (figure, layer) -> what a drift / fluctuation / floor was computed over
    figures: dict[tuple[str, str], Figure] = field(default_factory=dict)
    # (layer, step) -> a weight layer's gradient norm (probe.gradient_norm_steps)
    grad_norms: dict[tuple[str, int], float | None] = field(default_factory=dict)

    def grad_layers(self) -> list[str]:
        """The weight layers with gradient-norm records, in the order they were
        recorded: the modules' order in the network (forward order for covshift's
        builders; ``blocks.2`` before ``blocks.10``)."""
        return list(dict.fromkeys(layer for layer, _ in self.grad_norms))

    def layers(self) -> list[str]:
        """The eval-mode probed layers, in the order the probe records them (the
        modules' order in the network, which is forward order for covshift's builders)."""
        return [k for k in self.drift if not k.endswith(TRAIN_MODE)]

    def layer(self, name: str) -> str:
        """``first`` / ``last`` (optionally with ``@train``) resolved to a layer name."""
        base, suffix = (
            (name[: -len(TRAIN_MODE)], TRAIN_MODE) if name.endswith(TRAIN_MODE) else (name, "")
        )
        if base in ("first", "last"):
            ordered = self.layers()
            if not ordered:
                return name
            return (ordered[0] if base == "first" else ordered[-1]) + suffix
        return name

    @property
    def status(self) -> str:
        return self.run.status if self.run is not None else "not started"

    @property
    def complete(self) -> bool:
        """Whether the point's run has ended as planned: ``finished``, or ``diverged``
        (stopped by the divergence rule, which is an outcome). A ``running``,
        ``interrupted`` or ``failed`` run holds a prefix of its curves and records, so
        its "final" accuracy or first-to-last drift would be that of an earlier step:
        it gives no numbers until it is resumed to its end."""
        return self.run is not None and self.run.status in COMPLETE_STATUSES

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    def value(self, metric: str | MetricPath) -> float | None:
        """The value of a metric path; None when it is not measured (or not finite)."""
        return self.reading(metric).value

    def reading(self, metric: str | MetricPath) -> Reading:
        """The metric with its bounds: a time to target is known to the evaluation
        interval, ``(previous evaluation, first evaluation that reached it]``, and a
        censored one (``reach/``, never reached) only as at least the last evaluation;
        everything else is exact."""
        m = parse_metric(metric) if isinstance(metric, str) else metric
        if not self.complete:
            return Reading(None)  # not measured yet (no run, or one that has not ended)
        if m.kind in ("steps_to", "reach"):
            return self._time_to_target(m)
        if m.kind in ("drift", "fluct", "floor") and self.run is not None:
            base = (m.layer or "").removesuffix(TRAIN_MODE)
            if base == MEAN or base.startswith(MEAN + ":"):  # not a layer named "mean_x"
                return self._mean_figure(m)
            return self._figure(m)
        found = self._value(m)
        return Reading(None if found is None else Bounds.exact(found))

    def _mean_figure(self, m: MetricPath) -> Reading:
        """``<figure>/mean`` (every probed layer) or ``<figure>/mean:<glob>`` (the probed
        layers whose names match it; ``@train`` for their train-mode records): the
        mean of the layers' figures, not measurable if any of them is not."""
        spec = m.layer or ""
        base, suffix = (
            (spec[: -len(TRAIN_MODE)], TRAIN_MODE) if spec.endswith(TRAIN_MODE) else (spec, "")
        )
        pattern = base[len(MEAN) + 1 :] if base.startswith(MEAN + ":") else "**"
        layers = [name for name in self.layers() if glob_match(name, pattern)]
        readings = [self._figure(replace(m, layer=name + suffix)) for name in layers]
        excluded = sum(r.excluded for r in readings)
        units = sum(r.units for r in readings)
        reasons = [
            f"{name}: {r.reason}" for name, r in zip(layers, readings, strict=True) if r.reason
        ]
        if reasons:
            return Reading(None, "; ".join(reasons), excluded, units)
        values = [r.value for r in readings]
        if not values or any(v is None for v in values):
            return Reading(None)
        return Reading(Bounds.exact(float(np.mean(values))), None, excluded, units)

    def _figure(self, m: MetricPath) -> Reading:
        figure = self.figures.get((_figure_name(m), self.layer(m.layer or "")))
        if figure is None:  # numbers made by hand (tests) or a layer not recorded
            found = self._value(m)
            return Reading(None if found is None else Bounds.exact(found))
        if not figure.measurable or figure.value is None:
            return Reading(None, figure.reason, figure.excluded, figure.total)
        return Reading(Bounds.exact(figure.value), None, figure.excluded, figure.total)

    def _time_to_target(self, m: MetricPath) -> Reading:
        assert m.target is not None
        steps, values = self.series.get(m.series or "", (np.array([]), np.array([])))
        if self.run is None or not len(steps):
            return Reading(None)
        reached = values <= m.target if m.lower_is_better else values >= m.target
        hits = np.nonzero(reached & np.isfinite(values))[0]
        if len(hits):
            h = int(hits[0])
            at = float(steps[h])
            return Reading(Bounds(at, float(steps[h - 1]) if h > 0 else 0.0, at))
        if m.kind == "reach" and self.planned is not None:
            censored = float(self.planned[0] + self.planned[1])
            return Reading(Bounds(censored, float(steps[-1]), np.inf))
        return Reading(None)

    def _value(self, m: MetricPath) -> float | None:
        if self.run is None:
            return None
        if m.kind == "log10":
            assert m.inner is not None
            inner = self.reading(m.inner).value
            return math.log10(inner) if inner is not None and inner > 0 else None
        if m.kind == "diverged":
            return 1.0 if self.diverged else 0.0
        if m.kind in ("drift", "fluct", "floor") and m.scale == "layer":
            figure = self.figures.get((_figure_name(m), self.layer(m.layer or "")))
            return figure.value if figure is not None else None
        if m.kind == "drift":
            return self.drift.get(self.layer(m.layer or ""))
        if m.kind == "fluct":
            return self.fluct.get(self.layer(m.layer or ""))
        if m.kind == "floor":
            return self.floor.get(self.layer(m.layer or ""))
        if m.kind == "smooth":
            return self.measures.get((SMOOTHNESS_LAYER, m.stat or ""))
        if m.kind == "grad_norm":
            return self.grad_norms.get((m.layer or "", int(m.when or 0)))
        if m.kind == "batch_stats":
            stat = BATCH_STATS[m.stat or ""]
            if m.layer != "mean":
                return self.measures.get((m.layer or "", stat))
            found = [v for (_, s), v in self.measures.items() if s == stat]
            if not found or any(v is None for v in found):
                return None
            return float(np.mean(found))  # type: ignore[arg-type]
        if m.kind == "ics":
            if m.layer != "mean":
                return self.measures.get((m.layer or "", m.stat or ""))
            found = [
                v
                for (layer, stat), v in self.measures.items()
                if stat == m.stat and layer != SMOOTHNESS_LAYER
            ]
            if not found or any(v is None for v in found):
                return None
            with _quiet():
                return _finite(np.mean(found))
        steps, values = self.series.get(m.series or "", (np.array([]), np.array([])))
        if not len(steps):
            return None
        if m.kind == "rise":
            assert m.fraction is not None
            planned = self.planned[0] if self.planned is not None else int(steps[-1])
            before = np.nonzero(steps <= m.fraction * planned)[0]
            if not len(before) or before[-1] == len(steps) - 1:
                return None  # no evaluation before the last one to compare with
            return _finite(values[-1] - values[before[-1]])
        if m.when == "final":
            return _finite(values[-1])
        if m.when in ("max", "min"):
            finite = values[np.isfinite(values)]
            if not len(finite):
                return None
            return float(finite.max() if m.when == "max" else finite.min())
        hit = np.nonzero(steps == m.when)[0]
        if len(hit):
            return _finite(values[hit[0]])
        # A diverged run stopped early: later checkpoints carry its last evaluation.
        if self.diverged and isinstance(m.when, int) and m.when > steps[-1]:
            return _finite(values[-1])
        return None

    def headline(self, checkpoints: tuple[int, ...]) -> dict[str, Any]:
        """The numbers tables show for a point (and, for text, the final test loss
        in bits per byte)."""
        steps = self.series.get("test_accuracy", (np.array([]),))[0]
        text = len(self.series.get("test_bpb", (np.array([]),))[0]) > 0
        bits = {"test_bpb": {"final": self.value("test_bpb/final")}} if text else {}
        return {
            "status": self.status,
            "complete": self.complete,
            "run_id": self.run.id if self.run is not None else None,
            "diverged_at": self.run.diverged_at if self.run is not None else None,
            "final_step": int(steps[-1]) if len(steps) else 0,
            "test_accuracy": {
                **{str(c): self.value(f"test_accuracy/{c}") for c in checkpoints},
                "final": self.value("test_accuracy/final"),
            },
            "test_loss": {"final": self.value("test_loss/final")},
            **bits,
            "drift": dict(self.drift) if self.complete else {},
        }


def probed_layers(store: Store, run_id: int) -> list[str]:
    """The layers whose eval-mode distributions the probe recorded (not their
    ``@train`` / ``@floor`` companions, nor gradient-ICS or smoothness records)."""
    return [
        layer
        for layer in store.probe_layers(run_id)
        if not layer.endswith((FLOOR, TRAIN_MODE))
        and "quantiles" in store.probe_stats(run_id, layer)
    ]


# Norms with running statistics: before the probe learned to use the probe batch's own
# statistics when they have seen no batch (records marked norm_batch_stats), their
# step-0 eval record went through the initial mean 0 / variance 1 (docs/probe.md).
_RUNNING_STATS_NORMS = {"batch", "batch_renorm", "ghost_batch", "batch_noisy", "sync_batch"}
_ACTIVATIONS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu"}


def _layer_records(
    store: Store, run_id: int, layer: str, skip_first: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(steps, quantiles (R, Q, U), saturation (R, U) or None)`` of one layer, the
    first record left out when ``skip_first``."""
    steps, quantiles = store.probe(run_id, layer, "quantiles")
    saturation = None
    if "saturation" in store.probe_stats(run_id, layer):
        sat_steps, sat = store.probe(run_id, layer, "saturation")
        if np.array_equal(sat_steps, steps):
            saturation = sat
    if skip_first and len(steps) > 2:
        return steps[1:], quantiles[1:], None if saturation is None else saturation[1:]
    return steps, quantiles, saturation


@_quiet()
def load_numbers(
    store: Store, run: RunInfo | None, planned: tuple[int, int] | None = None
) -> PointNumbers:
    """Everything :class:`PointNumbers` needs from one run, read once; ``planned`` is
    the point's ``(steps, eval_every)``, for censored metrics (``reach/``).

    Drift, fluctuation and noise floor are computed over the units that are usable at
    the records they compare (:mod:`covshift.probe.figures`): a layer whose units
    collapsed, saturated or died reads "not measurable" with the reason, never a
    number. A run that has not ended (running, interrupted, failed) gives its curves
    and nothing else (:attr:`PointNumbers.complete`). A normalized network recorded
    before the probe used the probe batch's own statistics for norms that had seen no
    batch has its step-0 record left out (it went through the initial running
    statistics, not what the network computes)."""
    if run is None:
        return PointNumbers(None, planned=planned)
    model = (run.config or {}).get("point", {}).get("model", {})
    activation = _ACTIVATIONS.get(str(model.get("activation")))
    series = {name: store.scalars(run.id, name) for name in SERIES}
    numbers = PointNumbers(run, series, planned=planned)
    if not numbers.complete:  # its curves are drawn; no figure is read from a prefix
        return numbers
    layers = store.probe_layers(run.id)
    for layer in layers:
        stats = store.probe_stats(run.id, layer)
        if "quantiles" not in stats:  # gradient-ICS, smoothness, gradient-norm records
            if GRAD_NORM_STAT in stats:
                at, values = store.probe(run.id, layer, GRAD_NORM_STAT)
                for step, value in zip(at, values, strict=True):
                    numbers.grad_norms[(layer, int(step))] = _finite(float(value))
            for stat in stats:
                if stat in MEASURED:
                    _, values = store.probe(run.id, layer, stat)
                    mean = float(np.mean(values)) if len(values) else float("nan")
                    numbers.measures[(layer, stat)] = _finite(mean)
            if "grad_ics_l2" in stats and "grad_norm" in stats:
                relative = relative_gradient_ics(
                    store.probe(run.id, layer, "grad_ics_l2")[1],
                    store.probe(run.id, layer, "grad_norm")[1],
                )
                numbers.measures[(layer, RELATIVE_ICS)] = relative.value
            continue
        if layer.endswith(FLOOR):
            continue
        old_reference = model.get("norm") in _RUNNING_STATS_NORMS and (
            "norm_batch_stats" not in stats
        )
        steps, q, sat = _layer_records(store, run.id, layer, old_reference)
        kind = activation if layer.removesuffix(TRAIN_MODE).endswith(".act") else None
        figures = {
            "drift": drift_figure(q, sat, activation=kind),
            "drift_layer": drift_figure(q, sat, activation=kind, scale="layer"),
            "fluct": fluctuation_figure(q, sat, activation=kind),
            "fluct_layer": fluctuation_figure(q, sat, activation=kind, scale="layer"),
        }
        if layer + FLOOR in layers:
            f_steps, f_q, f_sat = _layer_records(store, run.id, layer + FLOOR, False)
            figures["floor"] = floor_figure(q, steps, f_q, f_steps, sat, f_sat, activation=kind)
            figures["floor_layer"] = floor_figure(
                q, steps, f_q, f_steps, sat, f_sat, activation=kind, scale="layer"
            )
        for name, figure in figures.items():
            numbers.figures[(name, layer)] = figure
        numbers.drift[layer] = figures["drift"].value
        numbers.fluct[layer] = figures["fluct"].value
        if "floor" in figures:
            numbers.floor[layer] = figures["floor"].value
    return numbers
