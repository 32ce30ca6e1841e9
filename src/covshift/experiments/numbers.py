"""A point's numbers, read from the store: series, drift, and any metric path.

:class:`PointNumbers` loads what one run recorded once and answers every metric path
of :mod:`covshift.experiments.metrics` from it; the headline numbers of tables, the
CSV and the claims all come from here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from covshift.experiments.metrics import (
    FLOOR,
    SERIES,
    SMOOTHNESS,
    TRAIN_MODE,
    MetricPath,
    parse_metric,
)
from covshift.probe.metrics import unit_quantile_drift, unit_widths
from covshift.store import RunInfo, Store

__all__ = ["PointNumbers", "load_numbers", "probed_layers"]

SMOOTHNESS_LAYER = "(model)"  # the layer name of smoothness records (SmoothnessMonitor)
MEASURED = {"grad_ics_cos", "grad_ics_l2", *SMOOTHNESS}


def _quiet() -> np.errstate:
    """A diverged run's records hold inf and NaN: what they make is not finite, and is
    reported as not measured (None), so numpy's warnings about it would say nothing."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


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
    def diverged(self) -> bool:
        return self.status == "diverged"

    def value(self, metric: str | MetricPath) -> float | None:
        """The value of a metric path; None when it is not measured (or not finite)."""
        m = parse_metric(metric) if isinstance(metric, str) else metric
        if self.run is None:
            return None
        if m.kind == "diverged":
            return 1.0 if self.diverged else 0.0
        if m.kind == "drift":
            return self.drift.get(self.layer(m.layer or ""))
        if m.kind == "floor":
            return self.floor.get(self.layer(m.layer or ""))
        if m.kind == "smooth":
            return self.measures.get((SMOOTHNESS_LAYER, m.stat or ""))
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
        if m.kind in ("steps_to", "reach"):
            assert m.target is not None
            reached = values <= m.target if m.lower_is_better else values >= m.target
            hits = np.nonzero(reached & np.isfinite(values))[0]
            if len(hits):
                return float(steps[hits[0]])
            if m.kind == "reach" and self.planned is not None:
                return float(self.planned[0] + self.planned[1])  # censored
            return None
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
        """The numbers tables show for a point."""
        steps = self.series.get("test_accuracy", (np.array([]),))[0]
        return {
            "status": self.status,
            "run_id": self.run.id if self.run is not None else None,
            "diverged_at": self.run.diverged_at if self.run is not None else None,
            "final_step": int(steps[-1]) if len(steps) else 0,
            "test_accuracy": {
                **{str(c): self.value(f"test_accuracy/{c}") for c in checkpoints},
                "final": self.value("test_accuracy/final"),
            },
            "test_loss": {"final": self.value("test_loss/final")},
            "drift": dict(self.drift),
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


@_quiet()
def load_numbers(
    store: Store, run: RunInfo | None, planned: tuple[int, int] | None = None
) -> PointNumbers:
    """Everything :class:`PointNumbers` needs from one run, read once; ``planned`` is
    the point's ``(steps, eval_every)``, for censored metrics (``reach/``)."""
    if run is None:
        return PointNumbers(None, planned=planned)
    series = {name: store.scalars(run.id, name) for name in SERIES}
    drift: dict[str, float | None] = {}
    floor: dict[str, float | None] = {}
    measures: dict[tuple[str, str], float | None] = {}
    layers = store.probe_layers(run.id)
    for layer in layers:
        stats = store.probe_stats(run.id, layer)
        if "quantiles" not in stats:  # gradient-ICS or smoothness records
            for stat in stats:
                if stat in MEASURED:
                    _, values = store.probe(run.id, layer, stat)
                    mean = float(np.mean(values)) if len(values) else float("nan")
                    measures[(layer, stat)] = _finite(mean)
            continue
        if layer.endswith(FLOOR):
            continue
        steps, quantiles = store.probe(run.id, layer, "quantiles")  # (R, Q, U)
        value = float(unit_quantile_drift(quantiles).mean()) if len(quantiles) >= 2 else None
        drift[layer] = value if value is not None and np.isfinite(value) else None
        if layer + FLOOR in layers:
            floor[layer] = _floor(
                steps, quantiles, *store.probe(run.id, layer + FLOOR, "quantiles")
            )
    return PointNumbers(run, series, drift, floor, measures, planned)


@_quiet()
def _floor(
    steps: np.ndarray, quantiles: np.ndarray, floor_steps: np.ndarray, floor_q: np.ndarray
) -> float | None:
    """The noise floor of a layer: the drift formula between the probe batch and the
    second batch at the same steps, with the drift's widths (see :mod:`.metrics`)."""
    q = np.asarray(quantiles, dtype=np.float64)
    width = unit_widths(q)  # (U,), the drift's own
    values = []
    for step, second in zip(floor_steps, np.asarray(floor_q, dtype=np.float64), strict=True):
        hit = np.nonzero(steps == step)[0]
        if len(hit):
            values.append(float((np.abs(second - q[hit[0]]).mean(axis=0) / width).mean()))
    if not values or not np.all(np.isfinite(values)):
        return None
    return float(np.mean(values))
