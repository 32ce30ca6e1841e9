"""Measuring internal covariate shift in any nn.Module.

- :mod:`covshift.probe.schedule`: when to record (every k steps, a list of steps).
- :mod:`covshift.probe.stats`: what to record (per-unit quantiles and moments).
- :mod:`covshift.probe.probe`: how to record (:class:`ShiftProbe`, forward hooks
  attached only while the probe batch runs).
- :mod:`covshift.probe.metrics`: how far the recorded distributions moved (drift).
"""

from covshift.probe.metrics import quantile_drift
from covshift.probe.probe import ProbeRecord, ShiftProbe
from covshift.probe.schedule import Schedule
from covshift.probe.stats import unit_moments, unit_quantiles, unit_view

__all__ = [
    "ProbeRecord",
    "Schedule",
    "ShiftProbe",
    "quantile_drift",
    "unit_moments",
    "unit_quantiles",
    "unit_view",
]
