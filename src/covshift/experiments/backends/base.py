"""What every backend shares: the contract with the driver, and claiming a point.

A backend only executes points (it knows nothing of claims or reports): it is given
the points still to run and reports, through :class:`SweepEvents`, when each starts,
how far it got, and how it ended. The in-process and pool backends claim and record
a point in the process that trains it (:func:`claim_and_train`); the Ray backend's
driver claims and records for its tasks, which never see the store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from covshift.checkpoints import FileCheckpointer, Rejection
from covshift.experiments.grid import Point
from covshift.experiments.point import (
    PointOutcome,
    StoreSink,
    dataset_for,
    error_text,
    train_point,
)
from covshift.store import Claim, NewRun, StorageFault, Store, StoreError
from covshift.training import TrainState, resolve_device

__all__ = [
    "Backend",
    "BackendError",
    "ProgressReporter",
    "SweepContext",
    "SweepEvents",
    "claim_and_train",
    "claim_point",
    "close_after_fault",
    "restart_after",
    "settled_outcome",
]


class BackendError(RuntimeError):
    """A backend cannot run points (Ray missing or unreachable, workers that die at
    start); the message says what to do."""


@dataclass(frozen=True)
class SweepContext:
    """What a backend needs to know about the sweep it runs points of."""

    store_path: str
    experiment_id: str
    preset: str


class SweepEvents(Protocol):
    """The driver's side: told when a point starts, advances and ends, and of what
    happened to it that the user must hear (a damaged checkpoint set aside)."""

    def started(self, point_id: str, run_id: int, step: int) -> None: ...
    def advanced(self, point_id: str, step: int) -> None: ...
    def ended(self, outcome: PointOutcome) -> None: ...
    def note(self, point_id: str, text: str) -> None: ...


class Backend(Protocol):
    """Executes points; ``workers`` points at a time, ``threads`` torch threads each.

    ``groups`` (optional) cuts ``points`` into batches, each trained as the members of
    one batched model (:mod:`covshift.batched`); without it every point trains alone.
    """

    name: str
    workers: int
    threads: int

    def run(
        self,
        points: Sequence[Point],
        context: SweepContext,
        events: SweepEvents,
        groups: Sequence[Sequence[Point]] | None = None,
    ) -> list[PointOutcome]: ...


def run_config(point: Point, context: SweepContext) -> dict[str, Any]:
    """What the store keeps in a run's ``config`` column."""
    return {
        "experiment": context.experiment_id,
        "network": point.network,
        "label": point.label,
        "axes": point.axes,
        "point": point.spec.model_dump(mode="json"),
    }


def claim_point(store: Store, point: Point, context: SweepContext, threads: int) -> Claim:
    """Claim ``point``'s run in ``store`` for this process (see :meth:`Store.claim_point`)."""
    return store.claim_point(
        NewRun(
            name=f"{context.preset}/{point.name}",
            config=run_config(point, context),
            seed=point.seed,
            preset=context.preset,
            experiment=context.experiment_id,
            device=str(resolve_device(point.spec.device)),
            torch_version=torch.__version__,
            point=point.id,
            threads=threads,
        )
    )


def settled_outcome(point: Point, claim: Claim) -> PointOutcome:
    """The outcome of a point its claim found ``done`` (finished or diverged earlier)
    or ``busy`` (another live process is training it): nothing to run here."""
    run = claim.run
    busy = claim.state == "busy"
    return PointOutcome(
        point.id,
        "busy" if busy else run.status,
        run.id,
        final_step=run.last_step,
        diverged_at=run.diverged_at,
        error=f"trained by process {run.pid} on {run.host}" if busy else None,
    )


class ProgressReporter:
    """A training-loop callback telling the driver where a point is (at most every
    ``interval`` seconds, and at every evaluation)."""

    def __init__(self, point_id: str, events: SweepEvents, interval: float = 0.25) -> None:
        self.point_id = point_id
        self.events = events
        self.interval = interval
        self._last = 0.0

    def on_step_end(self, state: TrainState) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.events.advanced(self.point_id, state.step)

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.events.advanced(self.point_id, state.step)


def restart_after(
    store: Store, run_id: int, rejection: Rejection, point: Point, events: SweepEvents
) -> str:
    """A checkpoint of run ``run_id`` was rejected (and kept aside): record it in the
    store, forget what the run recorded after step 0 (it records it again, from the
    start), tell the driver; returns the message."""
    message = f"{rejection.message}; run {run_id} ({point.name}) restarts from step 0"
    kept = str(rejection.kept_as) if rejection.kept_as is not None else None
    store.record_event(run_id, rejection.kind, message, path=kept)
    store.rewind_run(run_id, 0)
    events.note(point.id, message)
    return message


def close_after_fault(store: Store, run_id: int, name: str, fault: StoreError) -> StoreError:
    """Run ``run_id`` stopped on ``fault`` (a file that cannot be written or read):
    close it ``interrupted`` if the store still takes a write, and return the fault
    saying which (a run left ``running`` shows as stale once this process ends:
    ``covshift clean`` closes it, the next sweep resumes it)."""
    if not isinstance(fault, StorageFault):
        return fault
    try:
        store.finish_run(run_id, "interrupted", f"stopped: {fault.cause}")
    except StoreError:
        return fault.noted(
            f"Run {run_id} ({name}) could not be closed (the store cannot be written) and "
            "stays marked running: it shows as stale once this process ends; "
            "`covshift clean` closes it, and the next run resumes it."
        )
    return fault.noted(f"Run {run_id} ({name}) was closed as interrupted.")


def claim_and_train(
    store: Store,
    point: Point,
    context: SweepContext,
    *,
    threads: int,
    events: SweepEvents,
    background: bool | None,
    callbacks: tuple[object, ...] = (),
) -> PointOutcome:
    """Claim ``point`` and, unless it is done or busy, train it into ``store``.

    The run trains with the thread count it was started with (a resumed run keeps its
    own; see :mod:`covshift.experiments.point`); torch's setting is restored after. A
    checkpoint that fails its verification is kept aside and the run restarts from
    step 0 (:func:`restart_after`). A store or checkpoint file that cannot be written
    or read raises its :class:`StoreError`, the run closed as far as the store
    allows (:func:`close_after_fault`).
    """
    claim = claim_point(store, point, context, threads)
    run = claim.run
    if claim.state in ("done", "busy"):
        return settled_outcome(point, claim)

    def rejected(rejection: Rejection) -> None:
        restart_after(store, run.id, rejection, point, events)

    keeper = FileCheckpointer(
        store.checkpoint_path(run.id), owner=store.checkpoint_owner(run.id), on_rejected=rejected
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(run.threads or threads)
    try:
        events.started(point.id, run.id, run.last_step if claim.state == "resume" else 0)
        data = dataset_for(point.spec)
        outcome = train_point(
            point.spec,
            data,
            StoreSink(store, run.id),
            checkpoint=keeper,
            background=background,
            callbacks=(ProgressReporter(point.id, events), *callbacks),
        )
    except KeyboardInterrupt:
        return PointOutcome(point.id, "interrupted", run.id, final_step=store.run(run.id).last_step)
    except StoreError as fault:
        raise close_after_fault(store, run.id, point.name, fault) from None
    except Exception as e:  # the dataset could not be loaded, say: the run failed
        store.finish_run(run.id, "failed", error_text(e))
        return PointOutcome(point.id, "failed", run.id, error=error_text(e))
    finally:
        torch.set_num_threads(previous)
    return PointOutcome(**{**outcome.__dict__, "run_id": run.id})
