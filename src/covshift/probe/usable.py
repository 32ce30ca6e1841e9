"""Which units of a layer can carry a scale-relative statistic, record by record.

A drift measured in units of each unit's own spread (:func:`~covshift.probe.shift_metrics.
unit_quantile_drift`) divides by that spread: a unit whose values no longer vary
(vanishing signal in a deep sigmoid network), or that sits where its activation
passes nothing (a saturated sigmoid, a dead ReLU), makes the quotient as large as the
division allows (1e5 to 1e10 in a 16-layer sigmoid MLP that does not train) while
describing no shift the next layer could see. Such units are detected, per record,
from what every record already stores (docs/metrics.md, "Degenerate units"):

- **non-finite**: a quantile (or the saturation fraction) is NaN or infinite;
- **collapsed**: the unit's outer-quantile width is at most ``collapse_floor`` (1e-3)
  times the layer's *magnitude* at that record::

      width_u(r) = Q_{u,hi}(r) - Q_{u,lo}(r)
      s(r)       = median_u max_q |Q_{u,q}(r)|          (over the finite units)
      collapsed  <=>  width_u(r) <= collapse_floor * s(r)

  The magnitude, not the typical width: when every unit of a layer collapses to a
  constant (what vanishing signal does), the widths collapse with them and a
  threshold relative to them would flag nothing, while the constants keep their size;
- **inactive**: the stored ``saturation`` fraction is at least ``saturation_limit``
  (0.99): 99 % of the probe inputs fall where a sigmoid or tanh has less than 5 % of
  its peak slope, or below zero for a ReLU (:mod:`covshift.probe.saturation`). The
  activation then passes a constant, whatever its input does; for a sigmoid or tanh
  the unit is *saturated*, for a ReLU *dead*.

The rule is applied offline, to stored arrays, so that stores recorded before it
existed are read with it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["UnitStates", "UsableRule", "usable_units"]


@dataclass(frozen=True)
class UsableRule:
    """Thresholds of the rule (their reasons: docs/metrics.md, "Degenerate units").

    Attributes:
        collapse_floor: a unit whose outer-quantile width is at most this fraction of
            the layer's magnitude is collapsed.
        saturation_limit: a unit whose saturation fraction is at least this is
            saturated (sigmoid, tanh) or dead (ReLU).
        min_usable_fraction: a layer figure is measurable when at least this fraction
            of the layer's units (or measurements) is usable.
    """

    collapse_floor: float = 1e-3
    saturation_limit: float = 0.99
    min_usable_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("collapse_floor", "saturation_limit", "min_usable_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"UsableRule.{name} must be a fraction in (0, 1], got {value!r}")


@dataclass(frozen=True)
class UnitStates:
    """Per record and unit, shape ``(R, U)`` each: what :func:`usable_units` found.

    A unit may be in several states at once; :attr:`usable` is a unit in none.
    """

    non_finite: np.ndarray
    collapsed: np.ndarray
    inactive: np.ndarray

    @property
    def usable(self) -> np.ndarray:
        return ~(self.non_finite | self.collapsed | self.inactive)


def _records(array: np.ndarray | None, ndim: int, name: str) -> np.ndarray | None:
    if array is None:
        return None
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == ndim - 1:
        a = a[None]  # one record
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes (records first), got shape {a.shape}")
    return a


def usable_units(
    quantiles: np.ndarray,
    saturation: np.ndarray | None = None,
    rule: UsableRule | None = None,
) -> UnitStates:
    """The states of every unit at every record (see the module docstring).

    Args:
        quantiles: ``(R, Q, U)`` stored quantiles, levels increasing along ``Q``
            (``(Q, U)`` is one record); at least two levels.
        saturation: ``(R, U)`` stored saturation fractions, or None where the layer
            feeds no sigmoid, tanh or ReLU (no unit is then inactive).
        rule: the thresholds (default :class:`UsableRule`).

    Returns:
        :class:`UnitStates` with ``(R, U)`` boolean arrays. No numpy warnings: a
        non-finite value marks its unit non-finite and takes part in nothing else.
    """
    rule = rule or UsableRule()
    q = _records(quantiles, 3, "quantiles")
    assert q is not None
    if q.shape[1] < 2:
        raise ValueError(f"quantiles need at least two levels for a width, got shape {q.shape}")
    finite_q = np.isfinite(q).all(axis=1)  # (R, U)
    safe = np.where(np.isfinite(q), q, 0.0)
    with np.errstate(over="ignore"):  # a width beyond float64's range is inf: not collapsed
        width = safe[:, -1, :] - safe[:, 0, :]
    magnitude = np.abs(safe).max(axis=1)  # (R, U)
    scale = np.zeros(q.shape[0])
    for r in range(q.shape[0]):  # a median over the finite units of each record
        if finite_q[r].any():
            # Of the halves: the mean of the two middle values cannot overflow.
            scale[r] = 2.0 * np.median(0.5 * magnitude[r, finite_q[r]])
    collapsed = finite_q & (width <= rule.collapse_floor * scale[:, None])
    sat = _records(saturation, 2, "saturation")
    if sat is None:
        inactive = np.zeros_like(finite_q)
        finite = finite_q
    else:
        if sat.shape != finite_q.shape:
            raise ValueError(
                f"saturation has shape {sat.shape}; the quantiles give {finite_q.shape} "
                "(records, units)"
            )
        finite_s = np.isfinite(sat)
        finite = finite_q & finite_s
        inactive = finite_s & (np.where(finite_s, sat, 0.0) >= rule.saturation_limit)
    return UnitStates(~finite, collapsed & finite, inactive & finite)
