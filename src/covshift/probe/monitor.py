"""The plumbing shared by the measurements that run as callbacks of covshift's loop.

Gradient ICS and landscape smoothness measure on a training batch at due steps. As
callbacks of :func:`covshift.training.train` they share what happens around the
measurement: the schedule, a batch drawn by a private generator (seeded by ``seed``
and the step, so that the loop's batches and random stream are untouched), and the
sink that receives the :class:`~covshift.probe.ProbeRecord` s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.nn.functional as F

from covshift.probe._copies import LossFn, draw_batch
from covshift.probe.record import ProbeRecord
from covshift.probe.schedule import Schedule

__all__ = ["TrainingMonitor"]


class TrainingMonitor:
    """A callback that calls :meth:`measure` on a private training batch at each due
    step (after the optimizer step) and hands its records to ``sink``.

    Args:
        every / steps / schedule: when to measure (one of them; default every 100).
        loss_fn: the training loss (default cross-entropy, as covshift.train does).
        batch_size: examples per measurement batch (default: the training batch size).
        seed: seed of the private batch generator.
        sink: receives the records (default: kept in :attr:`records`).
    """

    def __init__(
        self,
        *,
        every: int | None = None,
        steps: Iterable[int] | None = None,
        schedule: Schedule | None = None,
        loss_fn: LossFn = F.cross_entropy,
        batch_size: int | None = None,
        seed: int = 0,
        sink: Callable[[ProbeRecord], None] | None = None,
    ) -> None:
        self.schedule = Schedule.resolve(every, steps, schedule)
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.seed = seed
        self.records: list[ProbeRecord] = []
        self._sink = sink or self.records.append

    def measure(self, state: Any, inputs: Any, targets: Any) -> list[ProbeRecord]:
        """The records of one measurement at ``state.step`` on ``(inputs, targets)``."""
        raise NotImplementedError

    def on_train_start(self, state: Any) -> None:
        self.on_step_end(state)

    def on_step_end(self, state: Any) -> None:
        if not self.schedule.due(state.step):
            return
        x, y = draw_batch(state, self.batch_size, self.seed, state.step)
        for record in self.measure(state, x, y):
            self._sink(record)
