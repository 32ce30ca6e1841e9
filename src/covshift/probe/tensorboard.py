"""Export probe records to TensorBoard event files (the optional ``tensorboard`` extra).

``TensorBoardSink(log_dir)`` is a record sink: pass it as ``ShiftProbe(sink=...)`` (or
call it from your own sink). Per record it writes

- every 0-d statistic as a scalar ``<layer>/<stat>`` (``pooled_mean``, ``pooled_std``,
  ``pooled_saturation``, ``grad_ics_cos``, ``loss_range``, ...);
- the layer aggregates of :func:`covshift.probe.shift_metrics.compare` against the layer's
  first record as ``<layer>/shift/<metric>`` (``mean_shift``, ``kl``, ``w1``, ...);
- the pooled histogram as ``<layer>/values`` with ``add_histogram_raw``, from the
  recorded counts: no values are copied to the host for it.

Needs ``pip install 'covshift[tensorboard]'`` (uses ``torch.utils.tensorboard``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from covshift.probe.record import ProbeRecord
from covshift.probe.scalars import RecordScalars

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Write :class:`~covshift.probe.ProbeRecord` s to TensorBoard.

    Args:
        log_dir: folder of the event files (ignored when ``writer`` is given).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` to write into.
        shift: also write the shift metrics against each layer's first record.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        shift: bool = True,
    ) -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "TensorBoard export needs the tensorboard package: "
                    "pip install 'covshift[tensorboard]'"
                ) from error
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer
        self.shift = shift
        self._scalars = RecordScalars(shift=shift)

    def __call__(self, record: ProbeRecord) -> None:
        layer, step, stats = record.layer, record.step, record.stats
        for name, value in self._scalars(record).items():
            self.writer.add_scalar(name, value, step)
        if "hist" in stats and "hist_edges" in stats:
            self._histogram(layer, step, stats)

    def _histogram(self, layer: str, step: int, stats: dict[str, np.ndarray]) -> None:
        counts = np.asarray(stats["hist"], dtype=np.float64)
        edges = np.asarray(stats["hist_edges"], dtype=np.float64)
        num = float(counts.sum())
        mean = float(stats.get("pooled_mean", 0.0))
        std = float(stats.get("pooled_std", 0.0))
        self.writer.add_histogram_raw(
            f"{layer}/values",
            min=float(edges[0]),
            max=float(edges[-1]),
            num=num,
            sum=mean * num,
            sum_squares=(std**2 + mean**2) * num,
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
