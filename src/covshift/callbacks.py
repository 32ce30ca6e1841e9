"""Recording a run to the store (one path for every writer), and the progress display."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from covshift.probe import ProbeRecord
from covshift.probe.units import store_columns
from covshift.store import Store
from covshift.training import TrainState

__all__ = ["StoreRecorder", "make_progress"]


class StoreRecorder:
    """The one path that writes a run to the store: its evaluations, its probe records
    (with the axis that held their units), and its end (with ``diverged_at`` for a
    diverged run). A callback of :func:`covshift.training.train` as it is; a sweep's point
    (:class:`covshift.experiments.point.StoreSink`) and the trainer callbacks' run row
    (:mod:`covshift.integrations._store_run`) write through it too."""

    def __init__(self, store: Store, run_id: int) -> None:
        self.store = store
        self.run_id = run_id

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.store.log_scalars(self.run_id, step, dict(values))

    def probe_sink(self, record: ProbeRecord) -> None:
        """Pass as ``ShiftProbe(sink=...)``: records go straight to the store."""
        self.store.log_probe(
            self.run_id,
            record.step,
            record.layer,
            record.stats,
            **store_columns(record.unit_axis),
        )

    def finish(self, status: str, error: str | None = None, diverged_at: int | None = None) -> None:
        """Close the run with ``status``; ``diverged_at`` exactly when it is ``diverged``."""
        self.store.finish_run(self.run_id, status, error, diverged_at=diverged_at)

    # -- the training loop's events -----------------------------------------
    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.log_scalars(state.step, metrics)

    def on_train_end(self, state: TrainState, status: str) -> None:
        error = None if status != "failed" else "training raised an exception"
        self.finish(status, error, state.outcome_step if status == "diverged" else None)


def make_progress(
    *,
    transient: bool = False,
    disable: bool = False,
    detail: str = "acc {task.fields[acc]}",
    console: Console | None = None,
) -> Progress:
    """A rich progress display: description, bar, steps done of total, ``detail`` (by
    default the latest test accuracy), elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(detail),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=transient,
        disable=disable,
        console=console,
    )
