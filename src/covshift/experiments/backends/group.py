"""Claiming and training a batch of points in the process that trains them.

:func:`claim_and_train_group` is :func:`~covshift.experiments.backends.base.
claim_and_train` for a batch: every point is claimed in the store as its own run (a
point another process holds, or one recorded meanwhile, is left out), each keeps its
own checkpoint file and store rows, and those claimed train together as the members
of one batched model (:func:`~covshift.experiments.point_members.train_point_members`),
a batch of one point too (its numbers are then those it has in any batch). Without
batches (``--members 1``) the backends call ``claim_and_train`` itself: today's path.

Checkpoints and faults are handled as for a single point: each member's checkpoint is
verified before it is resumed from, and a rejected one is kept aside, recorded, and
that member restarts from step 0 (:func:`~covshift.experiments.backends.base.
restart_after`; the batched trainer trains members at different steps in separate
batches); a store or checkpoint file that cannot be written or read stops the whole
batch, every member's run still open is closed as far as the store allows
(:func:`~covshift.experiments.backends.base.close_after_fault`), and the fault raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from covshift.checkpoints import FileCheckpointer, Rejection
from covshift.experiments.backends.base import (
    ProgressReporter,
    SweepContext,
    SweepEvents,
    claim_and_train,
    claim_point,
    close_after_fault,
    restart_after,
    settled_outcome,
)
from covshift.experiments.grid import Point
from covshift.experiments.members import batch_key
from covshift.experiments.point import PointOutcome, StoreSink, dataset_for, error_text
from covshift.experiments.point_members import train_point_members
from covshift.store import RunInfo, Store, StoreError

__all__ = ["claim_and_train_group"]


def claim_and_train_group(
    store: Store,
    points: Sequence[Point],
    context: SweepContext,
    *,
    threads: int,
    events: SweepEvents,
    background: bool | None,
    callbacks: tuple[object, ...] = (),
    batched: bool = True,
) -> list[PointOutcome]:
    """Claim ``points`` and train those not done or busy as one batch; one outcome per
    point, in order. The batch trains with the thread count of its first run (a
    resumed run keeps its own). A point whose model has no batched form, or any point
    with ``batched=False`` (no batches planned: ``--members 1``), trains alone through
    :func:`~covshift.experiments.backends.base.claim_and_train`."""
    if not batched:
        return [
            claim_and_train(
                store,
                point,
                context,
                threads=threads,
                events=events,
                background=background,
                callbacks=callbacks,
            )
            for point in points
        ]
    if len(points) == 1 and batch_key(points[0].spec) is None:
        return [
            claim_and_train(
                store,
                points[0],
                context,
                threads=threads,
                events=events,
                background=background,
                callbacks=callbacks,
            )
        ]
    outcomes: dict[str, PointOutcome] = {}
    claimed = []
    try:
        for point in points:
            claim = claim_point(store, point, context, threads)
            if claim.state in ("done", "busy"):
                outcomes[point.id] = settled_outcome(point, claim)
            else:
                claimed.append((point, claim))
    except StoreError as fault:
        raise _close_all(store, [(p, c.run) for p, c in claimed], fault) from None
    if claimed:
        for point, outcome in zip(
            [p for p, _ in claimed],
            _train_claimed(store, claimed, threads, events, callbacks),
            strict=True,
        ):
            outcomes[point.id] = outcome
    return [outcomes[p.id] for p in points]


def _train_claimed(
    store: Store,
    claimed: list,  # (point, claim) pairs
    threads: int,
    events: SweepEvents,
    callbacks: tuple[object, ...],
) -> list[PointOutcome]:
    runs = [claim.run for _, claim in claimed]

    def keeper(point: Point, run: RunInfo) -> FileCheckpointer:
        def rejected(rejection: Rejection) -> None:
            restart_after(store, run.id, rejection, point, events)

        return FileCheckpointer(
            store.checkpoint_path(run.id),
            owner=store.checkpoint_owner(run.id),
            on_rejected=rejected,
        )

    keepers = [keeper(point, run) for (point, _), run in zip(claimed, runs, strict=True)]
    previous = torch.get_num_threads()
    torch.set_num_threads(runs[0].threads or threads)
    try:
        for (point, claim), run in zip(claimed, runs, strict=True):
            events.started(point.id, run.id, run.last_step if claim.state == "resume" else 0)
        data = dataset_for(claimed[0][0].spec)
        outcomes = train_point_members(
            [p.spec for p, _ in claimed],
            data,
            [StoreSink(store, run.id) for run in runs],
            checkpoints=keepers,
            background=False,  # K background records at once would fight for one core
            callbacks=[(ProgressReporter(p.id, events), *callbacks) for p, _ in claimed],
        )
    except KeyboardInterrupt:
        return [
            PointOutcome(p.id, "interrupted", run.id, final_step=store.run(run.id).last_step)
            for (p, _), run in zip(claimed, runs, strict=True)
        ]
    except StoreError as fault:
        pairs = [(p, run) for (p, _), run in zip(claimed, runs, strict=True)]
        raise _close_all(store, pairs, fault) from None
    except Exception as e:  # the dataset could not be loaded, say: every run failed
        for run in runs:
            store.finish_run(run.id, "failed", error_text(e))
        return [
            PointOutcome(p.id, "failed", run.id, error=error_text(e))
            for (p, _), run in zip(claimed, runs, strict=True)
        ]
    finally:
        torch.set_num_threads(previous)
    return [
        PointOutcome(**{**o.__dict__, "run_id": run.id})
        for o, run in zip(outcomes, runs, strict=True)
    ]


def _close_all(
    store: Store, pairs: Sequence[tuple[Point, RunInfo]], fault: StoreError
) -> StoreError:
    """Close every run of ``pairs`` still open after ``fault`` (a member that ended
    before it keeps its status), each as far as the store allows; the fault, saying
    what became of them."""
    for point, run in pairs:
        try:
            still_open = store.run(run.id).status == "running"
        except StoreError:  # cannot even be read: try to close it anyway
            still_open = True
        if still_open:
            fault = close_after_fault(store, run.id, point.name, fault)
    return fault
