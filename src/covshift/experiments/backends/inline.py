"""The in-process backend: points one after another in the driver's own process.

What ``--workers 1`` runs: no process to start, torch keeps every core (its threads
are the ``threads`` setting), and the probe may record in the background when a core
is spare. Ctrl-C stops the point in training (recorded as ``interrupted``, resumable
from its last checkpoint) and the sweep. A batch of points (``groups``) trains as the
members of one batched model.
"""

from __future__ import annotations

from collections.abc import Sequence

from covshift.experiments.backends.base import SweepContext, SweepEvents
from covshift.experiments.backends.group import claim_and_train_group
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
        self,
        points: Sequence[Point],
        context: SweepContext,
        events: SweepEvents,
        groups: Sequence[Sequence[Point]] | None = None,
    ) -> list[PointOutcome]:
        outcomes: dict[str, PointOutcome] = {}
        with Store(context.store_path) as store:
            for group in groups if groups is not None else [[p] for p in points]:
                done = claim_and_train_group(
                    store,
                    group,
                    context,
                    threads=self.threads,
                    events=events,
                    background=None,
                    batched=groups is not None,
                )
                for outcome in done:
                    events.ended(outcome)
                    outcomes[outcome.point] = outcome
                if any(o.status == "interrupted" for o in done):
                    raise KeyboardInterrupt
        return [outcomes[p.id] for p in points if p.id in outcomes]
