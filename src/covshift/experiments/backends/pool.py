"""The local backend: points in a pool of worker processes on this machine.

``workers`` processes (started with ``spawn``: a forked torch may deadlock in its
thread pools) each train one point (or one batch of points, the members of one
batched model) at a time with ``threads`` torch threads, and
claim and record it in the shared store themselves (SQLite in WAL mode serializes
their writes). The driver learns how far each point got from the store itself (its
run's last recorded step and owner), so no lock is shared with a process that may be
killed while holding it; the stop flag is a lock-free byte of shared memory. The pool
is the standard library's :class:`~concurrent.futures.ProcessPoolExecutor`; nothing
here schedules.

What can go wrong, and what happens:

- Ctrl-C (or SIGTERM) in the driver: workers ignore SIGINT; the driver sets a stop
  flag that each training loop checks every few steps, so every point in training is
  closed as ``interrupted`` (resumable from its last checkpoint) and the sweep stops.
  A second Ctrl-C kills the workers (their runs are then ``stale``, resumable too).
- A worker dies (killed, out of memory, a crash in native code): the pool breaks;
  the driver starts a new one and runs what is unfinished again, the points that were
  in training resuming from their checkpoints. A point whose worker died
  ``max_failures`` + 1 times is recorded ``failed``.
- The driver dies (SIGKILL): each worker asked the kernel to kill it when its parent
  goes (``PR_SET_PDEATHSIG`` on Linux; elsewhere a watchdog thread notices within a
  second), so no orphan goes on writing; the next run of the sweep resumes.
- The store or a checkpoint cannot be written or read (a full disk, an I/O error, a
  read-only remount, a damaged store): the worker that meets it closes its run
  ``interrupted`` if the store still takes it, and raises; the driver stops the other
  workers as on Ctrl-C, then raises one :class:`~covshift.store.StoreError` that says
  what became of every run in training.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from covshift.experiments.backends.base import BackendError, SweepContext, SweepEvents
from covshift.experiments.backends.group import claim_and_train_group
from covshift.experiments.grid import Point
from covshift.experiments.point import PointOutcome, preload_datasets, shared_datasets
from covshift.store import StorageFault, Store, StoreError
from covshift.training import TrainState

__all__ = ["PoolBackend"]

_PR_SET_PDEATHSIG = 1
_STOP_CHECK_EVERY = 8  # steps between looks at the stop flag
_POLL_SECONDS = 0.25  # how often the driver reads progress from the store
_WORKER: dict[str, Any] = {}  # this worker process's stop flag, threads and store


# -- inside a worker process ---------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:  # also where prctl exists: it covers a parent that died first
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="covshift-parent-watch", daemon=True).start()


def _init_worker(
    stop: Any, threads: int, parent_pid: int, datasets: dict[tuple[str, str | None, str], Any]
) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us through `stop`
    torch.set_num_threads(threads)
    _WORKER.update(stop=stop, threads=threads)
    preload_datasets(datasets)


class _Silent:
    """Workers report nothing directly: the driver reads their progress in the store."""

    def started(self, point_id: str, run_id: int, step: int) -> None:
        pass

    def advanced(self, point_id: str, step: int) -> None:
        pass

    def ended(self, outcome: PointOutcome) -> None:
        pass

    def note(self, point_id: str, text: str) -> None:
        pass  # recorded in the store, where the driver's watcher reads it


class _StopRequest:
    """Raises KeyboardInterrupt in the training loop once the driver asks to stop."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop

    def on_step_end(self, state: TrainState) -> None:
        if state.step % _STOP_CHECK_EVERY == 0 and self.stop.value:
            raise KeyboardInterrupt


def _run_group(points: list[Point], context: SweepContext, batched: bool) -> list[PointOutcome]:
    if _WORKER["stop"].value:  # queued before the stop: leave it untouched
        return [PointOutcome(point.id, "not started") for point in points]
    store = _WORKER.get("store")
    if store is None or str(store.path) != context.store_path:
        store = _WORKER["store"] = Store(context.store_path)
    return claim_and_train_group(
        store,
        points,
        context,
        threads=_WORKER["threads"],
        events=_Silent(),
        background=False,  # the other workers hold the other cores
        callbacks=(_StopRequest(_WORKER["stop"]),),
        batched=batched,
    )


# -- the driver's side ---------------------------------------------------------------
_DIED_AT_START = (
    "the sweep's worker processes died before training any point. Workers are started "
    "with multiprocessing's spawn, which imports the main module again: a script that "
    "runs a sweep must do so under `if __name__ == '__main__':`. Otherwise run with "
    "--workers 1 to see the error in this process."
)


class PoolBackend:
    """``workers`` worker processes with ``threads`` torch threads each."""

    name = "local"

    def __init__(self, workers: int, threads: int, *, max_failures: int = 2) -> None:
        if workers < 1 or threads < 1:
            raise ValueError(f"workers and threads must be >= 1, got {workers} and {threads}")
        self.workers = workers
        self.threads = threads
        self.max_failures = max_failures

    def run(
        self,
        points: Sequence[Point],
        context: SweepContext,
        events: SweepEvents,
        groups: Sequence[Sequence[Point]] | None = None,
    ) -> list[PointOutcome]:
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.RawValue("b", 0)  # one byte: written by the driver, read by workers
        outcomes: dict[str, PointOutcome] = {}
        deaths: Counter[str] = Counter()
        remaining = [list(g) for g in groups] if groups is not None else [[p] for p in points]
        shared = shared_datasets(points)
        faults: list[StoreError] = []
        with Store(context.store_path) as store:
            watcher = _Watcher(store, points, events)
            while remaining:
                with ProcessPoolExecutor(
                    max_workers=min(self.workers, len(remaining)),
                    mp_context=ctx,
                    initializer=_init_worker,
                    initargs=(stop, self.threads, os.getpid(), shared),
                ) as pool:
                    batched = groups is not None
                    futures = {pool.submit(_run_group, g, context, batched): g for g in remaining}
                    broken = self._collect(futures, stop, watcher, events, outcomes, faults)
                if faults:
                    raise _one_fault(faults)
                if stop.value:
                    raise KeyboardInterrupt
                if broken:
                    if not watcher.training():
                        raise BackendError(_DIED_AT_START)
                    self._count_deaths(store, watcher, deaths, outcomes, events)
                remaining = [
                    left for g in remaining if (left := [p for p in g if p.id not in outcomes])
                ]
        return [outcomes[p.id] for p in points]

    def _collect(
        self,
        futures: dict[Future[list[PointOutcome]], list[Point]],
        stop: Any,
        watcher: _Watcher,
        events: SweepEvents,
        outcomes: dict[str, PointOutcome],
        faults: list[StoreError],
    ) -> bool:
        """Report progress and results until every future is done; True if the pool
        broke (a worker died). A store or checkpoint file that cannot be used, met by
        a worker or here, goes to ``faults`` and stops the other workers."""
        pending = set(futures)
        broken = False
        deadline: float | None = None

        def stop_all() -> None:
            nonlocal deadline
            stop.value = 1  # every training loop stops within a few steps
            for future in pending:
                future.cancel()
            deadline = time.monotonic() + 60.0

        while pending:
            try:
                if not faults:  # the store may not even be readable any more
                    watcher.poll()
                done, pending = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.cancelled():
                        continue
                    try:
                        done_points = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except StoreError as fault:
                        faults.append(fault)
                        if not stop.value:
                            stop_all()
                        continue
                    if not faults:
                        watcher.poll()
                    for outcome in done_points:
                        if outcome.status == "not started":
                            continue
                        outcomes[outcome.point] = outcome
                        watcher.ended(outcome.point)
                        events.ended(outcome)
                if deadline is not None and time.monotonic() > deadline:
                    raise KeyboardInterrupt  # the workers did not stop: kill them
            except StoreError as fault:  # the driver's own read of the store
                faults.append(fault)
                if not stop.value:
                    stop_all()
            except KeyboardInterrupt:
                if not stop.value:  # first Ctrl-C: ask every training loop to stop
                    stop_all()
                    continue
                for pid in watcher.owners().values():  # second Ctrl-C, or no answer
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if faults:  # what stopped the sweep, rather than a Ctrl-C nobody typed
                    raise _one_fault(faults) from None
                raise
        return broken

    def _count_deaths(
        self,
        store: Store,
        watcher: _Watcher,
        deaths: Counter[str],
        outcomes: dict[str, PointOutcome],
        events: SweepEvents,
    ) -> None:
        """After a broken pool: the points that were training count one death each
        (the pool ends them all, so each is a suspect); past ``max_failures`` a point
        is recorded as failed instead of being run again."""
        watcher.poll()
        for point_id, run in watcher.training().items():
            deaths[point_id] += 1
            watcher.forget(point_id)
            if deaths[point_id] <= self.max_failures:
                continue
            error = f"its worker process died {deaths[point_id]} times"
            store.finish_run(run, "failed", error)
            outcome = PointOutcome(point_id, "failed", run, error=error)
            watcher.ended(point_id)
            outcomes[point_id] = outcome
            events.ended(outcome)


def _one_fault(faults: list[StoreError]) -> StoreError:
    """The first fault, saying what became of the runs of all of them."""
    first = faults[0]
    if not isinstance(first, StorageFault):
        return first
    notes = [n for f in faults if isinstance(f, StorageFault) for n in f.notes]
    return StorageFault(first.path, first.cause, tuple(dict.fromkeys(notes)), first.advice)


class _Watcher:
    """Reads the sweep's progress from the store: which points a worker has claimed
    (their run ids and owners) and how far they got."""

    def __init__(self, store: Store, points: Sequence[Point], events: SweepEvents) -> None:
        self.store = store
        self.ids = [p.id for p in points]
        self.events = events
        self._steps: dict[str, int] = {}
        self._runs: dict[str, tuple[int, int]] = {}  # point -> (run id, worker pid)
        self._ended: set[str] = set()
        self._me = os.getpid()
        latest = store.events()[-1:]
        self._seen_event = latest[0].id if latest else 0  # events before the sweep: told

    def poll(self) -> None:
        self._poll_events()
        open_ids = [i for i in self.ids if i not in self._ended]
        for point_id, run in self.store.runs_of_points(open_ids).items():
            if run.status != "running" or run.pid in (None, self._me):
                continue
            if point_id not in self._runs or self._runs[point_id][1] != run.pid:
                self._runs[point_id] = (run.id, run.pid)
                self._steps[point_id] = run.last_step
                self.events.started(point_id, run.id, run.last_step)
            elif run.last_step != self._steps[point_id]:
                self._steps[point_id] = run.last_step
                self.events.advanced(point_id, run.last_step)

    def _poll_events(self) -> None:
        """Tell the driver what workers recorded as events (checkpoints set aside)."""
        fresh = self.store.events(after=self._seen_event)
        if not fresh:
            return
        self._seen_event = fresh[-1].id
        points = {run.id: p for p, run in self.store.runs_of_points(self.ids).items()}
        for event in fresh:
            if event.run_id in points:
                self.events.note(points[event.run_id], event.message)

    def ended(self, point_id: str) -> None:
        """The point has its outcome: stop following it."""
        self._ended.add(point_id)
        self._runs.pop(point_id, None)

    def forget(self, point_id: str) -> None:
        """The point's worker died: follow it afresh when it runs again."""
        self._runs.pop(point_id, None)

    def training(self) -> dict[str, int]:
        """Points being trained (as far as the store says): point -> run id."""
        return {p: run for p, (run, _) in self._runs.items()}

    def owners(self) -> dict[str, int]:
        return {p: pid for p, (_, pid) in self._runs.items()}
