"""A layer's headline figures, computed over usable units only, each saying what it
was computed over and whether it could be computed honestly.

Every function here takes the arrays the store keeps (``Store.probe(run, layer,
stat)``: quantiles ``(R, Q, U)``, saturation ``(R, U)``, gradient-ICS scalars
``(R,)``) and returns a :class:`Figure`: the value (None when not measurable), how many
units (or measurements) there were, how many were excluded and why, and a reason
string. Units are excluded by :func:`~covshift.probe.usable.usable_units` (collapsed,
saturated or dead, non-finite); a unit must be usable at every record a figure
compares. The formulas and thresholds, with their reasons, are in docs/metrics.md
("Degenerate units" and "Drift figures"):

- :func:`drift_figure`: first-to-last quantile displacement, in units of each unit's
  mean width (``scale="unit"``, today's figure) or of the layer's typical width at the
  first record (``scale="layer"``, robust to single units whose width shrinks);
- :func:`fluctuation_figure`: the same displacement between consecutive records,
  averaged (the step-to-step motion that first-to-last displacement ignores);
- :func:`floor_figure`: the same displacement between two probe batches at the same
  weights, with the drift's units and widths (the measurement's noise floor);
- :func:`relative_gradient_ics`: ``||G - G'|| / ||G||`` averaged over measurements.

Non-finite inputs never give a number: the figure is not measurable, with the count.
No function emits numpy warnings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from covshift.probe.shift_metrics import unit_widths
from covshift.probe.usable import UnitStates, UsableRule, usable_units

__all__ = [
    "Figure",
    "drift_figure",
    "floor_figure",
    "fluctuation_figure",
    "relative_gradient_ics",
]

Scale = Literal["unit", "layer"]
_KINDS = (None, "sigmoid", "tanh", "relu")
# How each exclusion reads after "N of M units" (in the order units are counted: a
# unit in several states counts under the first).
_PHRASES = {
    "non_finite": "non-finite",
    "saturated": "saturated",
    "dead": "dead",
    "collapsed": "collapsed",
    "zero_gradient": "at zero gradient",
}


@dataclass(frozen=True)
class Figure:
    """One figure of a layer and what it was computed over.

    Attributes:
        value: the figure, or None when it is not measurable.
        measurable: whether ``value`` is a number that can be trusted.
        reason: ``"61 of 64 units (3 dead excluded)"`` when measurable;
            ``"not measurable: 60 of 64 units collapsed"`` (or another cause) when not.
        total: units of the layer (measurements, for gradient ICS).
        what: ``"units"`` or ``"measurements"``.
        non_finite, saturated, dead, collapsed, zero_gradient: how many were
            excluded for each cause; each counts once, under its first cause in this
            order.
    """

    value: float | None
    measurable: bool
    reason: str
    total: int
    what: str = "units"
    non_finite: int = 0
    saturated: int = 0
    dead: int = 0
    collapsed: int = 0
    zero_gradient: int = 0

    @property
    def excluded(self) -> int:
        """Units (or measurements) left out, for any cause."""
        return sum(getattr(self, key) for key in _PHRASES)

    @property
    def used(self) -> int:
        return self.total - self.excluded

    def as_dict(self) -> dict[str, Any]:
        """Plain fields plus ``excluded``, for JSON."""
        return {**asdict(self), "excluded": self.excluded}


def _describe(total: int, what: str, counts: dict[str, int], measurable: bool, usable: bool) -> str:
    """``usable``: enough units were left, and the figure came out non-finite anyway."""
    excluded = sum(counts.values())
    parts = [(n, _PHRASES[k]) for k, n in counts.items() if n]
    listed = ", ".join(f"{n} {phrase}" for n, phrase in parts)
    if counts.get("non_finite"):
        return f"not measurable: non-finite values in {counts['non_finite']} of {total} {what}"
    if measurable:
        return f"{total - excluded} of {total} {what}" + (f" ({listed} excluded)" if parts else "")
    if total == 0:
        return f"not measurable: no {what}"
    if usable:
        return "not measurable: the figure is not finite"
    if len(parts) == 1:
        return f"not measurable: {parts[0][0]} of {total} {what} {parts[0][1]}"
    return f"not measurable: {excluded} of {total} {what} excluded ({listed})"


def _figure(
    value: float | None,
    total: int,
    counts: dict[str, int],
    rule: UsableRule,
    what: str = "units",
) -> Figure:
    """A Figure from a candidate value and the exclusion counts: measurable when no
    input was non-finite, the usable share reaches the rule's fraction and the value
    is finite."""
    used = total - sum(counts.values())
    enough = not counts.get("non_finite") and used >= 1 and used >= rule.min_usable_fraction * total
    measurable = enough and value is not None and bool(np.isfinite(value))
    return Figure(
        float(value) if measurable and value is not None else None,
        measurable,
        _describe(total, what, counts, measurable, enough),
        total,
        what,
        **counts,
    )


def _not_measurable(reason: str, total: int) -> Figure:
    return Figure(None, False, f"not measurable: {reason}", total)


def _exclusions(
    non_finite: np.ndarray, inactive: np.ndarray, collapsed: np.ndarray, activation: str | None
) -> tuple[np.ndarray, dict[str, int]]:
    """The usable mask ``(U,)`` and the counts per cause, each unit counted once."""
    if activation not in _KINDS:
        raise ValueError(
            f"activation must be 'sigmoid', 'tanh', 'relu' or None, got {activation!r}"
        )
    inactive = inactive & ~non_finite
    collapsed = collapsed & ~non_finite & ~inactive
    usable = ~(non_finite | inactive | collapsed)
    label = "dead" if activation == "relu" else "saturated"
    counts = {"non_finite": int(non_finite.sum()), label: int(inactive.sum())}
    counts["collapsed"] = int(collapsed.sum())
    return usable, counts


def _states_at(states: UnitStates, records: list[int], activation: str | None) -> Any:
    """Usable mask and counts for units that must be usable at ``records`` (and finite
    at every record, since the unit widths average over all of them)."""
    return _exclusions(
        states.non_finite.any(axis=0),
        states.inactive[records].any(axis=0),
        states.collapsed[records].any(axis=0),
        activation,
    )


def _check(quantiles: np.ndarray) -> np.ndarray:
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 3 or q.shape[1] < 2:
        raise ValueError(
            f"expected quantile records of shape (records, levels >= 2, units), got {q.shape}"
        )
    return q


def _check_scale(scale: str) -> None:
    if scale not in ("unit", "layer"):
        raise ValueError(f"scale must be 'unit' or 'layer', got {scale!r}")


def _divisor(q: np.ndarray, usable: np.ndarray, scale: Scale) -> np.ndarray | float:
    """``w_u`` of the usable units (``scale="unit"``), or the layer's typical width at
    the first record, ``median_u (Q_{u,hi}(0) - Q_{u,lo}(0))`` over them (``"layer"``)."""
    if scale == "unit":
        return unit_widths(q)[usable]
    return float(np.median(q[0, -1, usable] - q[0, 0, usable]))


def drift_figure(
    quantiles: np.ndarray,
    saturation: np.ndarray | None = None,
    *,
    activation: str | None = None,
    scale: Scale = "unit",
    rule: UsableRule | None = None,
) -> Figure:
    """The layer's drift between its first and last records, over usable units::

        d_u = (1/|Q|) sum_q |Q_{u,q}(R-1) - Q_{u,q}(0)|
        unit:  drift = mean_{u usable} d_u / w_u
               w_u = (1/R) sum_r (Q_{u,hi}(r) - Q_{u,lo}(r))
        layer: drift = mean_{u usable} d_u / S_0
               S_0 = median_{u usable} (Q_{u,hi}(0) - Q_{u,lo}(0))

    A unit is usable when it is neither collapsed nor saturated/dead at the first and
    the last record (:func:`~covshift.probe.usable.usable_units`). With every unit
    usable, ``scale="unit"`` is exactly today's figure,
    ``unit_quantile_drift(quantiles).mean()``.

    Args:
        quantiles: ``(R, Q, U)`` stored quantiles.
        saturation: ``(R, U)`` stored saturation fractions (None: not recorded).
        activation: the kind the layer feeds (``"sigmoid"``, ``"tanh"``, ``"relu"``),
            which only names the inactive units (dead for a ReLU, saturated
            otherwise); None when unknown (they are then counted as saturated).
        scale: ``"unit"`` or ``"layer"``.
        rule: thresholds (default :class:`~covshift.probe.usable.UsableRule`).
    """
    rule = rule or UsableRule()
    _check_scale(scale)
    q = _check(quantiles)
    if q.shape[0] < 2:
        return _not_measurable(f"{q.shape[0]} record (a drift compares two)", q.shape[2])
    usable, counts = _states_at(usable_units(q, saturation, rule), [0, -1], activation)
    value = None
    if usable.any() and not counts["non_finite"]:
        with np.errstate(all="ignore"):
            displacement = np.abs(q[-1] - q[0]).mean(axis=0)[usable]  # (U usable,)
            value = float((displacement / _divisor(q, usable, scale)).mean())
    return _figure(value, q.shape[2], counts, rule)


def fluctuation_figure(
    quantiles: np.ndarray,
    saturation: np.ndarray | None = None,
    *,
    activation: str | None = None,
    scale: Scale = "unit",
    rule: UsableRule | None = None,
) -> Figure:
    """The mean displacement between consecutive records, over units usable at every
    record::

        fluctuation = (1/(R-1)) sum_{r=1}^{R-1} mean_{u usable}
                      (1/|Q|) sum_q |Q_{u,q}(r) - Q_{u,q}(r-1)| / w_u   (or / S_0)

    with :func:`drift_figure`'s ``w_u`` and ``S_0``. First-to-last displacement ignores,
    by design, motion that comes back (Santurkar et al. 2018's noisy BN injects a new
    mean and scale at every step); this figure counts it. With records ``k`` steps
    apart it is the displacement per ``k`` steps; ``(R - 1) * fluctuation`` is the path
    length, at least the drift (equal for motion in one direction). Two records: the
    drift itself. Arguments as :func:`drift_figure`.
    """
    rule = rule or UsableRule()
    _check_scale(scale)
    q = _check(quantiles)
    if q.shape[0] < 2:
        return _not_measurable(f"{q.shape[0]} record (a fluctuation needs two)", q.shape[2])
    every = list(range(q.shape[0]))
    usable, counts = _states_at(usable_units(q, saturation, rule), every, activation)
    value = None
    if usable.any() and not counts["non_finite"]:
        with np.errstate(all="ignore"):
            steps = np.abs(np.diff(q[:, :, usable], axis=0)).mean(axis=1)  # (R-1, U usable)
            value = float((steps / _divisor(q, usable, scale)).mean(axis=1).mean())
    return _figure(value, q.shape[2], counts, rule)


def floor_figure(
    quantiles: np.ndarray,
    steps: np.ndarray,
    floor_quantiles: np.ndarray,
    floor_steps: np.ndarray,
    saturation: np.ndarray | None = None,
    floor_saturation: np.ndarray | None = None,
    *,
    activation: str | None = None,
    scale: Scale = "unit",
    rule: UsableRule | None = None,
) -> Figure:
    """The noise floor of :func:`drift_figure`: the same displacement between the probe
    batch and a second batch at the same weights, with the drift's units and widths::

        floor = mean_{pairs (r, f)} mean_{u usable} (1/|Q|) sum_q |F_{u,q}(f) - Q_{u,q}(r)| / w_u

    over every floor record ``f`` whose step is a probe record ``r``'s step; ``w_u``
    (or ``S_0``, ``scale="layer"``) from the probe's records, as the drift's. A unit is
    usable when the drift can use it (first and last records) and it is usable at
    every paired record of both batches, so drift and floor describe the same units.

    Args:
        quantiles, steps: the probe batch's records ``(R, Q, U)`` and their steps ``(R,)``.
        floor_quantiles, floor_steps: the second batch's records ``(F, Q, U)``, ``(F,)``.
        saturation, floor_saturation: their saturation fractions (None: not recorded).
        activation, scale, rule: as :func:`drift_figure`.
    """
    rule = rule or UsableRule()
    _check_scale(scale)
    q, fq = _check(quantiles), _check(floor_quantiles)
    steps, floor_steps = np.asarray(steps).reshape(-1), np.asarray(floor_steps).reshape(-1)
    if len(steps) != q.shape[0] or len(floor_steps) != fq.shape[0] or fq.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"floor_figure: probe records {q.shape} with {len(steps)} steps, floor records "
            f"{fq.shape} with {len(floor_steps)} steps; each needs one step per record and "
            "the same (levels, units)"
        )
    pairs = [
        (int(np.nonzero(steps == s)[0][0]), f)
        for f, s in enumerate(floor_steps)
        if np.any(steps == s)
    ]
    if not pairs or q.shape[0] < 1:
        return _not_measurable("no floor record at a step of the probe's records", q.shape[2])
    probe = usable_units(q, saturation, rule)
    second = usable_units(fq, floor_saturation, rule)
    probe_records = sorted({0, q.shape[0] - 1, *(r for r, _ in pairs)})
    floor_records = [f for _, f in pairs]
    usable, counts = _exclusions(
        probe.non_finite.any(axis=0) | second.non_finite[floor_records].any(axis=0),
        probe.inactive[probe_records].any(axis=0) | second.inactive[floor_records].any(axis=0),
        probe.collapsed[probe_records].any(axis=0) | second.collapsed[floor_records].any(axis=0),
        activation,
    )
    value = None
    if usable.any() and not counts["non_finite"]:
        divisor = _divisor(q, usable, scale)
        with np.errstate(all="ignore"):
            per_pair = [
                float((np.abs(fq[f][:, usable] - q[r][:, usable]).mean(axis=0) / divisor).mean())
                for r, f in pairs
            ]
            value = float(np.mean(per_pair))
    return _figure(value, q.shape[2], counts, rule)


def relative_gradient_ics(
    l2: np.ndarray, grad_norm: np.ndarray, *, rule: UsableRule | None = None
) -> Figure:
    """Santurkar et al. 2018's gradient ICS relative to the gradient, averaged::

        relative = (1/M) sum_m ||G_m - G'_m|| / ||G_m||

    over the measurements ``m`` with ``||G_m|| > 0`` (the stored ``grad_ics_l2`` and
    ``grad_norm``, ``(M,)`` each). A measurement at zero gradient has no relative
    shift and is excluded (``zero_gradient``); fewer than the rule's fraction of
    measurements left, or any non-finite value, make the figure not measurable.
    The mean of ratios, not the ratio of means: each measurement weighs the same,
    whatever its gradient's size.
    """
    rule = rule or UsableRule()
    a = np.asarray(l2, dtype=np.float64).reshape(-1)
    g = np.asarray(grad_norm, dtype=np.float64).reshape(-1)
    if a.shape != g.shape:
        raise ValueError(
            f"grad_ics_l2 has {a.size} measurements and grad_norm {g.size}; they must pair"
        )
    non_finite = ~(np.isfinite(a) & np.isfinite(g))
    zero = ~non_finite & (g <= 0)
    counts = {"non_finite": int(non_finite.sum()), "zero_gradient": int(zero.sum())}
    keep = ~(non_finite | zero)
    value = None
    if keep.any() and not counts["non_finite"]:
        with np.errstate(all="ignore"):
            value = float((a[keep] / g[keep]).mean())
    return _figure(value, a.size, counts, rule, what="measurements")
