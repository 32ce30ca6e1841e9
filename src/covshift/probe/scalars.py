"""Scalar summaries of probe records, for loggers that take ``name -> float`` per step.

A :class:`~covshift.probe.ProbeRecord` holds per-unit arrays; a logger (TensorBoard,
a trainer's loggers) takes scalars. Per record, :class:`RecordScalars` gives

- every 0-d statistic as ``<layer>/<stat>`` (``pooled_mean``, ``pooled_std``,
  ``pooled_saturation``, ``grad_ics_l2``, ``grad_ics_cos``, ``loss_range``, ...);
- with ``shift=True``, the layer aggregates of :func:`covshift.probe.shift_metrics.compare`
  of the record against the layer's first record as ``<layer>/shift/<metric>``
  (``mean_shift``, ``log_var_ratio``, ``kl``, ``w1``, ``hist_w1``, ...), for records
  that hold per-unit ``mean`` and ``std``.

Used by :class:`~covshift.probe.TensorBoardSink` and the trainer callbacks of
:mod:`covshift.integrations`, so both name the same series the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from covshift.probe.record import ProbeRecord
from covshift.probe.shift_metrics import compare

__all__ = ["RecordScalars"]


class RecordScalars:
    """Turns records into ``name -> float`` dicts (see the module docstring).

    Args:
        shift: add the shift metrics against each layer's first record.
        prefix: put before every name (``"covshift"`` gives ``covshift/<layer>/<stat>``).
        skip: 0-d statistics left out (e.g. ``("count",)``, constant over a run).
    """

    def __init__(self, *, shift: bool = True, prefix: str = "", skip: Iterable[str] = ()) -> None:
        self.shift = shift
        self.prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        self.skip = frozenset(skip)
        self._first: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, record: ProbeRecord) -> dict[str, float]:
        name = f"{self.prefix}{record.layer}"
        stats = record.stats
        out = {
            f"{name}/{key}": float(value)
            for key, value in stats.items()
            if np.ndim(value) == 0 and key not in self.skip
        }
        if self.shift and "mean" in stats and "std" in stats:
            first = self._first.setdefault(record.layer, stats)
            for metric, value in compare(first, stats).layer.items():
                out[f"{name}/shift/{metric}"] = float(value)
        return out
