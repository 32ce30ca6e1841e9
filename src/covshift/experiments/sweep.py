"""The sweep driver: plan the grid against the store, run what is missing, report.

A point that is finished or diverged in the store is never run again; any other point
runs (an interrupted, failed or stale one resumes from its checkpoint). Running a
sweep twice therefore costs nothing the second time, and a sweep killed at any moment
completes on the next call. The driver saves the experiment (its configuration and
grid) before the first point starts, so its report can be rebuilt from the store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID

from covshift.callbacks import make_progress
from covshift.experiments.backends import Backend, InlineBackend, PoolBackend, SweepContext
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import Point, expand_grid, experiment_id
from covshift.experiments.point import PointOutcome
from covshift.store import (
    FINAL_OUTCOMES,
    ExperimentPoint,
    NoStoreError,
    RunInfo,
    StorageFault,
    Store,
    StoreError,
)

__all__ = [
    "SweepPlan",
    "SweepResult",
    "available_cores",
    "make_backend",
    "plan_sweep",
    "record_experiment",
    "run_experiment",
    "run_sweep",
]


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SweepPlan:
    """A grid and what the store already holds of it."""

    config: ExperimentConfig
    experiment_id: str
    points: list[Point]
    recorded: dict[str, RunInfo] = field(default_factory=dict)

    def status(self, point: Point) -> str:
        run = self.recorded.get(point.id)
        return run.status if run is not None else "new"

    @property
    def to_run(self) -> list[Point]:
        return [p for p in self.points if self.status(p) not in FINAL_OUTCOMES]


def plan_sweep(config: ExperimentConfig, store_path: str | os.PathLike[str]) -> SweepPlan:
    """Expand ``config``'s grid and look its points up in the store, if there is one
    (reading only: planning never creates a store)."""
    points = expand_grid(config)
    recorded: dict[str, RunInfo] = {}
    if Path(store_path).is_file():
        try:
            with Store(store_path, create=False) as store:
                recorded = store.runs_of_points([p.id for p in points])
        except NoStoreError:
            pass  # an empty file, as an interrupted first run leaves: nothing recorded yet
    return SweepPlan(config, experiment_id(config), points, recorded)


def make_backend(
    name: str,
    *,
    points: int,
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    gpus: float = 0.0,
) -> Backend:
    """The backend for ``points`` points to run.

    ``local`` (default): ``workers`` processes (default: one per core, at most one per
    point) with ``threads`` torch threads each (default: the cores shared out, so
    workers x threads <= cores); one worker runs in this process. ``ray``: Ray tasks
    with ``threads`` CPUs each (default 1), on ``address`` or a local instance.
    """
    cores = available_cores()
    if name == "ray":
        from covshift.experiments.backends.ray_backend import RayBackend

        return RayBackend(address=address, threads=threads or 1, gpus=gpus)
    if name != "local":
        raise ValueError(f"--backend must be local or ray, got {name!r}")
    if address is not None:
        raise ValueError("--address joins a Ray cluster; use it with --backend ray")
    workers = workers or max(1, min(cores, points))
    threads = threads or max(1, cores // workers)
    if workers == 1:
        return InlineBackend(threads)
    return PoolBackend(workers, threads)


@dataclass(frozen=True)
class SweepResult:
    """What a call of :func:`run_sweep` did."""

    experiment_id: str
    outcomes: list[PointOutcome]
    seconds: float


def make_sweep_progress(*, disable: bool = False, console: Console | None = None) -> Progress:
    """One bar for a whole sweep: steps of every point, points done, ETA."""
    return make_progress(disable=disable, console=console, detail="steps, {task.fields[points]}")


class _SweepEvents:
    """Moves the sweep's bar as points advance; one line per point that ends."""

    def __init__(self, progress: Progress, plan: SweepPlan, points: Sequence[Point]) -> None:
        self.progress = progress
        self.by_id = {p.id: p for p in points}
        self.total = len(plan.points)
        self.done = self.total - len(points)
        self.steps: dict[str, int] = {p.id: 0 for p in points}
        self.task: TaskID = progress.add_task(
            plan.config.name,
            total=sum(p.spec.steps for p in points),
            points=self._points(),
        )

    def _points(self) -> str:
        return f"{self.done}/{self.total} points"

    def _move(self, point_id: str, step: int) -> None:
        step = min(step, self.by_id[point_id].spec.steps)
        delta = step - self.steps[point_id]
        if delta > 0:
            self.steps[point_id] = step
            self.progress.advance(self.task, delta)

    def started(self, point_id: str, run_id: int, step: int) -> None:
        self._move(point_id, step)

    def advanced(self, point_id: str, step: int) -> None:
        self._move(point_id, step)

    def note(self, point_id: str, text: str) -> None:
        # Printed even without a bar (--quiet, library calls): the user must hear it.
        point = self.by_id.get(point_id)
        name = point.name if point is not None else point_id
        self.progress.console.print(
            f"[yellow]{escape(name)}[/]: {escape(text)}", highlight=False, soft_wrap=True
        )

    def ended(self, outcome: PointOutcome) -> None:
        point = self.by_id.get(outcome.point)
        if point is None:
            return
        if outcome.status in FINAL_OUTCOMES:
            self._move(outcome.point, point.spec.steps)  # a diverged run ends early
            self.done += 1
        self.progress.update(self.task, points=self._points())
        if not self.progress.disable:  # quiet runs and library calls print nothing
            self.progress.console.print(_outcome_line(point, outcome), highlight=False)


_MARKS = {
    "finished": "[green]done[/]",
    "diverged": "[yellow]diverged[/]",
    "interrupted": "[yellow]interrupted[/]",
    "failed": "[red]failed[/]",
    "busy": "[yellow]busy[/]",
}


def _outcome_line(point: Point, outcome: PointOutcome) -> str:
    mark = _MARKS.get(outcome.status, outcome.status)
    parts = [f"{mark} {point.name}"]
    if outcome.status == "diverged":
        parts.append(f"at step {outcome.diverged_at}")
    if outcome.test_accuracy is not None:
        parts.append(f"acc {outcome.test_accuracy:.4f}")
    if outcome.seconds:
        parts.append(f"{outcome.seconds:.1f} s")
    if outcome.error:
        parts.append(f"({outcome.error.splitlines()[0]})")
    return "  ".join(parts)


def record_experiment(plan: SweepPlan, store: Store) -> None:
    """Save ``plan``'s configuration (claims included) and grid in ``store``, before
    any of its points runs: the pre-registration record (idempotent)."""
    store.save_experiment(
        plan.experiment_id,
        plan.config.name,
        plan.config.model_dump(mode="json"),
        [ExperimentPoint(p.id, p.position, p.network, p.seed, p.axes) for p in plan.points],
    )


def run_sweep(
    plan: SweepPlan,
    store: Store,
    backend: Backend,
    *,
    progress: Progress | None = None,
    groups: Sequence[Sequence[Point]] | None = None,
) -> SweepResult:
    """Record ``plan``'s experiment and run its unfinished points on ``backend``
    (``groups``: batches of them, each trained as one batched model; see
    :func:`covshift.experiments.planner.plan_members`).

    Raises KeyboardInterrupt when stopped by Ctrl-C (what was recorded stays, and the
    next call resumes), and a :class:`~covshift.store.StoreError` when the store or a
    checkpoint cannot be written or read (a full disk, say), which says what became of
    the runs in training; the next call resumes them too.
    """
    config = plan.config
    record_experiment(plan, store)
    points = plan.to_run
    context = SweepContext(str(store.path), plan.experiment_id, config.name)
    progress = progress or make_sweep_progress(disable=True)
    events = _SweepEvents(progress, plan, points)
    start = time.perf_counter()
    try:
        if groups is None:
            outcomes = backend.run(points, context, events) if points else []
        else:
            outcomes = backend.run(points, context, events, groups=groups) if points else []
    except StorageFault as fault:
        raise _saying_what_is_left(store, points, fault) from None
    return SweepResult(plan.experiment_id, outcomes, time.perf_counter() - start)


def _saying_what_is_left(
    store: Store, points: Sequence[Point], fault: StorageFault
) -> StorageFault:
    """``fault``, also naming the runs of ``points`` it left marked running that it does
    not name yet (a pool worker killed because it did not stop in time, say)."""
    try:
        runs = store.runs_of_points([p.id for p in points])
    except StoreError:
        return fault  # the store cannot even be read: the fault says why
    names = {p.id: p.name for p in points}
    left = [
        f"Run {run.id} ({names[point]}) stays marked running (its process stopped before "
        "it could close it): `covshift clean` closes it, and the next run resumes it."
        for point, run in sorted(runs.items(), key=lambda item: item[1].id)
        if run.status in ("running", "stale") and f"Run {run.id} (" not in str(fault)
    ]
    return fault.noted(*left) if left else fault


def run_experiment(
    config: ExperimentConfig,
    store: Store,
    *,
    backend: Backend | None = None,
    workers: int | None = 1,
    threads: int | None = None,
    progress: Progress | None = None,
    members: int | None = None,
) -> SweepResult:
    """Plan, check and run ``config``'s grid into ``store`` (the library's one call).

    ``backend`` defaults to the local one with ``workers`` (1: this process).
    ``members``: points per batched model (None: the planner chooses; 1: every point
    alone, the one-at-a-time path).
    """
    from covshift.experiments.members import recorded_batches
    from covshift.experiments.planner import plan_members
    from covshift.experiments.preflight import preflight

    plan = plan_sweep(config, store.path)
    backend = backend or make_backend(
        "local", points=len(plan.to_run), workers=workers, threads=threads
    )
    costs = preflight(config, plan.to_run, backend.threads)
    batches = plan_members(
        plan.to_run,
        costs,
        lanes=backend.workers or 1,
        threads=backend.threads,
        members=members,
        resumed=recorded_batches(plan.to_run, plan.recorded, store.path),
    )
    return run_sweep(plan, store, backend, progress=progress, groups=batches.backend_groups)
