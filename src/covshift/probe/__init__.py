"""Measuring internal covariate shift in any nn.Module.

- :mod:`~covshift.probe.select`: which modules (patterns, types, ``auto``).
- :mod:`~covshift.probe.schedule`: when to record (every k steps, listed, log-spaced).
- :mod:`~covshift.probe.hooks`: how values are captured (hooks that live for one forward).
- :mod:`~covshift.probe.units`: which axis of each layer's values holds its units.
- :mod:`~covshift.probe.stats`, :mod:`~covshift.probe.record_summary`,
  :mod:`~covshift.probe.saturation`: what is recorded (moments, quantiles,
  histograms, saturation), on the device, one host transfer per record.
- :mod:`~covshift.probe.distributed`: the same statistics across torch.distributed ranks.
- :mod:`~covshift.probe.probe`: :class:`ShiftProbe`, tying them together; its records
  are :class:`ProbeRecord` s (:mod:`~covshift.probe.record`).
- :mod:`~covshift.probe.norm_stats`: norm layers whose running statistics have seen no
  batch are probed with the probe batch's own statistics.
- :mod:`~covshift.probe.shift_metrics`: how far the recorded distributions moved;
  :mod:`~covshift.probe.usable` and :mod:`~covshift.probe.figures`: which units can
  carry a scale-relative figure, and the layer figures over those units only.
- :mod:`~covshift.probe.gradient_ics`, :mod:`~covshift.probe.smoothness`: Santurkar
  et al. 2018's gradient-based shift and landscape smoothness, without side effects.
- :mod:`~covshift.probe.scalars`: records as ``name -> float`` for loggers.
- :mod:`~covshift.probe.tensorboard`: export of records to TensorBoard (optional extra).
"""

from covshift.probe.figures import (
    Figure,
    drift_figure,
    floor_figure,
    fluctuation_figure,
    relative_gradient_ics,
)
from covshift.probe.gradient_ics import GradientICS, GradientICSMonitor, gradient_ics
from covshift.probe.probe import ShiftProbe
from covshift.probe.record import ProbeRecord
from covshift.probe.scalars import RecordScalars
from covshift.probe.schedule import Schedule
from covshift.probe.select import select_layers
from covshift.probe.shift_metrics import (
    Shift,
    compare,
    gaussian_kl,
    histogram_w1,
    log_var_ratio,
    mean_shift,
    quantile_drift,
    quantile_w1,
    sample_w1,
    shift_series,
)
from covshift.probe.smoothness import Smoothness, SmoothnessMonitor, landscape_smoothness
from covshift.probe.stats import Moments, unit_moments, unit_quantiles, unit_view
from covshift.probe.tensorboard import TensorBoardSink
from covshift.probe.units import UnitAxis, UnitAxisError, UnitAxisWarning
from covshift.probe.usable import UnitStates, UsableRule, usable_units

__all__ = [
    "Figure",
    "GradientICS",
    "GradientICSMonitor",
    "Moments",
    "ProbeRecord",
    "RecordScalars",
    "Schedule",
    "Shift",
    "ShiftProbe",
    "Smoothness",
    "SmoothnessMonitor",
    "TensorBoardSink",
    "UnitAxis",
    "UnitAxisError",
    "UnitAxisWarning",
    "UnitStates",
    "UsableRule",
    "compare",
    "drift_figure",
    "floor_figure",
    "fluctuation_figure",
    "gaussian_kl",
    "gradient_ics",
    "histogram_w1",
    "landscape_smoothness",
    "log_var_ratio",
    "mean_shift",
    "quantile_drift",
    "quantile_w1",
    "relative_gradient_ics",
    "sample_w1",
    "select_layers",
    "shift_series",
    "unit_moments",
    "unit_quantiles",
    "unit_view",
    "usable_units",
]
