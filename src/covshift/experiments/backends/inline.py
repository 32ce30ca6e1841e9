"""The in-process backend: points one after another in the driver's own process.

What ``--workers 1`` runs: no process to start, torch keeps every core (its threads
are the ``threads`` setting), and the probe may record in the background when a core
is spare. Ctrl-C stops the point in training (recorded as ``interrupted``, resumable
from its last checkpoint) and the sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

from covshift.experiments.backends.base import SweepContext, SweepEvents, claim_and_train
from covshift.experiments.grid import Point
from covshift.experiments.point import PointOutcome
from covshift.store import Store

__all__ = ["InlineBackend"]


class InlineBackend:
    """Runs points sequentially in this process with ``threads`` torch threads."""

    name = "inline"
    workers = 1

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def run(
        self, points: Sequence[Point], context: SweepContext, events: SweepEvents
    ) -> list[PointOutcome]:
        outcomes = []
        with Store(context.store_path) as store:
            for point in points:
                outcome = claim_and_train(
                    store, point, context, threads=self.threads, events=events, background=None
                )
                events.ended(outcome)
                outcomes.append(outcome)
                if outcome.status == "interrupted":
                    raise KeyboardInterrupt
        return outcomes
