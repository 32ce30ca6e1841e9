"""The Ray backend: points as Ray tasks, on one machine or a cluster.

Each point (or batch of points, the members of one batched model: one task for the
batch) is one Ray task (a streaming generator) that needs nothing from the driver's
disk: the dataset travels through Ray's object store (put once per sweep), the
point's spec and its last checkpoint (bytes) travel as arguments (a batch's: every
member's), and the task sends back, per point, at every evaluation, the records made
since the last one together with the new checkpoint. The driver alone writes the
store: it applies each chunk, keeps the latest checkpoint in a file beside the store,
and closes the run when the task ends. Ray's scheduler decides where and when tasks
run; the driver submits every point at once and only reacts to what comes back.

Failures:

- an exception in training ends the task normally with a ``failed`` outcome (as in
  the other backends);
- the task's process or node dies (a *crashed task*): the driver submits the point
  again with its last checkpoint, up to ``max_failures`` times, then records it
  ``failed``. Ray's own task retries are off, since a retried generator would
  replay chunks the driver has already written;
- Ctrl-C in the driver cancels every task; their runs are recorded ``interrupted``
  and resume from the checkpoint the driver holds;
- the driver dies: its Ray job's tasks end with it; the runs it owned show as
  ``stale`` and resume on the next call;
- a checkpoint the driver holds fails its digest check (or has none): it is kept
  aside, the event recorded and printed, and the point restarts from step 0; bytes
  that change on their way to or from a task are caught by the digest they travel
  with (see :mod:`covshift.checkpoint_files`);
- the store or a checkpoint file cannot be written or read (a full disk): every task
  is cancelled, each run closed ``interrupted`` if the store still takes it, and one
  :class:`~covshift.store.StoreError` says so.

Ray is an optional extra: ``pip install 'covshift[ray]'``. What runs inside a task
is in :mod:`.ray_task`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from covshift.checkpoint_files import (
    Rejected,
    Rejection,
    checkpoint_digest,
    read_checkpoint,
    remove_checkpoint,
    set_aside,
    write_checkpoint,
)
from covshift.data import is_text, load_dataset
from covshift.experiments.backends.base import (
    BackendError,
    SweepContext,
    SweepEvents,
    claim_point,
    close_after_fault,
    restart_after,
    settled_outcome,
)
from covshift.experiments.backends.ray_task import members_task, point_task
from covshift.experiments.grid import Point, PointSpec
from covshift.experiments.members import batch_key
from covshift.experiments.point import PointOutcome, StoreSink, dataset_arguments, error_text
from covshift.store import Store, StoreError

__all__ = ["RayBackend", "RayUnavailable"]


class RayUnavailable(BackendError):
    """Ray is not installed, or the cluster cannot be reached."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            "--backend ray needs Ray, an optional extra: pip install 'covshift[ray]'"
        ) from None
    return ray


# -- the driver's side ---------------------------------------------------------------
def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on (``ray.init`` would retry for
    minutes); ``auto``, ``ray://`` and None are left to Ray."""
    if address is None or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailable(
            f"--address {address!r}: expected host:port (as `ray start --head` prints), "
            "auto, or ray://host:port"
        )
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(
            f"cannot start or join the Ray cluster at {address}: nothing answers there "
            f"({e.strerror or e}); start one with `ray start --head` or drop --address"
        ) from None


@dataclass
class _Active:
    """A point submitted to Ray: its run, its attempts, and where its task runs."""

    point: Point
    run_id: int
    attempts: int = 0
    step: int = 0
    host: str | None = None
    pid: int | None = None
    digest: str | None = None  # of the checkpoint file the driver holds for it


def _dataset_payload(spec: PointSpec) -> dict[str, Any]:
    data = load_dataset(spec.dataset, spec.data_dir, **dataset_arguments(spec))
    if is_text(data):
        return {"text": data}
    return {
        "fields": {
            "name": data.name,
            "num_classes": data.num_classes,
            "image_shape": data.image_shape,
            "source": data.source,
        },
        "tensors": {
            k: getattr(data, k).numpy() for k in ("x_train", "y_train", "x_test", "y_test")
        },
    }


def _verified_checkpoint(store: Store, job: _Active, events: SweepEvents) -> bytes | None:
    """The bytes of the checkpoint the driver holds for ``job`` once verified (their
    digest goes to ``job.digest``); a damaged or unverified one is kept aside and the
    run restarts from step 0 (None)."""
    path = store.checkpoint_path(job.run_id)
    job.digest = None
    try:
        found = read_checkpoint(path)
    except Rejected as e:
        restart_after(store, job.run_id, set_aside(path, e), job.point, events)
        job.step = 0
        return None
    if found is None:
        return None
    data, job.digest = found
    return data


class RayBackend:
    """Points as Ray tasks with ``threads`` CPUs (and ``gpus`` GPUs) each.

    Args:
        address: a running cluster to join (``ray start --head`` prints it; ``auto``
            finds the local one); None starts a local Ray instance for this sweep and
            shuts it down after.
        threads: torch threads (and Ray CPUs) per point.
        gpus: GPUs Ray reserves per point (fractions share one).
        max_failures: resubmissions of a point whose task crashed.
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        threads: int = 1,
        gpus: float = 0.0,
        max_failures: int = 2,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.address = address
        self.threads = threads
        self.gpus = gpus
        self.max_failures = max_failures
        # What Ray runs at once: this machine's cores for a local instance; a cluster's
        # size is known once connected (cluster_workers).
        self.workers = 0 if address else max(1, (os.cpu_count() or 1) // threads)

    def connect(self) -> bool:
        """Join ``address`` or start a local instance; True if this call started it."""
        ray = _ray()
        if ray.is_initialized():
            return False
        _check_reachable(self.address)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network here
        try:
            ray.init(
                address=self.address,
                num_cpus=None if self.address else (os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                configure_logging=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise RayUnavailable(f"cannot start or join {where}: {e}") from None
        return True

    def cluster_workers(self) -> int:
        cpus = int(_ray().cluster_resources().get("CPU", 1))
        return max(1, cpus // self.threads)

    def run(
        self,
        points: Sequence[Point],
        context: SweepContext,
        events: SweepEvents,
        groups: Sequence[Sequence[Point]] | None = None,
    ) -> list[PointOutcome]:
        ray = _ray()
        started_here = self.connect()
        try:
            self.workers = self.cluster_workers()
            with Store(context.store_path) as store:
                batches = groups if groups is not None else [[p] for p in points]
                return self._run(ray, store, points, batches, context, events, groups is not None)
        finally:
            if started_here:
                ray.shutdown()

    def _run(
        self,
        ray: Any,
        store: Store,
        points: Sequence[Point],
        batches: Sequence[Sequence[Point]],
        context: SweepContext,
        events: SweepEvents,
        batched: bool,
    ) -> list[PointOutcome]:
        options = dict(num_cpus=self.threads, num_gpus=self.gpus, max_retries=0)
        single = ray.remote(point_task).options(**options)
        together = ray.remote(members_task).options(**options)
        data_refs: dict[str, list[Any]] = {}
        active: dict[Any, list[_Active]] = {}  # a task -> its points (a batch's members)
        outcomes: dict[str, PointOutcome] = {}

        def submit(jobs: list[_Active]) -> None:
            spec = jobs[0].point.spec
            key = f"{spec.dataset}:{spec.data_dir}:{dataset_arguments(spec)}"
            if key not in data_refs:
                data_refs[key] = [ray.put(_dataset_payload(spec))]
            saved = [_verified_checkpoint(store, job, events) for job in jobs]
            owners = [store.checkpoint_owner(job.run_id) for job in jobs]
            digests = [job.digest for job in jobs]
            data = data_refs[key]
            if not batched or batch_key(spec) is None:  # alone: today's path
                gen = single.remote(spec, data, key, saved[0], self.threads, owners[0], digests[0])
            else:
                specs = [job.point.spec for job in jobs]
                gen = together.remote(specs, data, key, saved, self.threads, owners, digests)
            active[gen] = jobs

        def end(job: _Active, outcome: PointOutcome) -> None:
            outcomes[job.point.id] = outcome
            events.ended(outcome)

        try:
            for batch in batches:
                jobs = []
                for point in batch:
                    claim = claim_point(store, point, context, self.threads)
                    if claim.state in ("done", "busy"):
                        end(_Active(point, claim.run.id), settled_outcome(point, claim))
                        continue
                    jobs.append(_Active(point, claim.run.id, step=claim.run.last_step))
                if jobs:
                    submit(jobs)
            while active:
                ready, _ = ray.wait(list(active), num_returns=1, timeout=0.5)
                for gen in ready:
                    jobs = active[gen]
                    open_jobs = [j for j in jobs if j.point.id not in outcomes]
                    try:
                        item = ray.get(next(gen))
                    except StopIteration:
                        del active[gen]
                        continue
                    except ray.exceptions.RayTaskError as e:
                        del active[gen]
                        cause = e.cause if e.cause is not None else e
                        for job in open_jobs:
                            end(job, self._fail(store, job, error_text(cause)))
                    except ray.exceptions.RayError as e:  # the task's process or node died
                        del active[gen]
                        again = []
                        for job in open_jobs:
                            job.attempts += 1
                            if job.attempts > self.max_failures:
                                error = f"its Ray task crashed {job.attempts} times: "
                                error += error_text(e)
                                end(job, self._fail(store, job, error))
                            else:
                                again.append(job)
                        if again:
                            submit(again)
                    else:
                        if item["kind"] == "hello":
                            for job in jobs:
                                self._apply(store, job, item, events)
                            continue
                        done = self._apply(store, jobs[item.get("member", 0)], item, events)
                        if done is not None:
                            end(jobs[item.get("member", 0)], done)
                            if all(j.point.id in outcomes for j in jobs):
                                del active[gen]
        except KeyboardInterrupt:
            for gen, jobs in active.items():
                ray.cancel(gen, force=True)
                for job in jobs:
                    if job.point.id not in outcomes:
                        store.finish_run(job.run_id, "interrupted")
            raise
        except StoreError as fault:
            # The store or a checkpoint beside it cannot be written or read: every task
            # stops, and each run is closed as far as the store allows.
            for gen in active:
                ray.cancel(gen, force=True)
            for jobs in active.values():
                for job in jobs:
                    if job.point.id not in outcomes:
                        fault = close_after_fault(store, job.run_id, job.point.name, fault)
            raise fault from None
        return [outcomes[p.id] for p in points]

    @staticmethod
    def _fail(store: Store, job: _Active, error: str) -> PointOutcome:
        store.finish_run(job.run_id, "failed", error)
        return PointOutcome(job.point.id, "failed", job.run_id, final_step=job.step, error=error)

    @staticmethod
    def _apply(
        store: Store, job: _Active, item: dict[str, Any], events: SweepEvents
    ) -> PointOutcome | None:
        """Write one chunk into the store; the outcome when the task is done."""
        kind = item["kind"]
        if kind == "hello":
            job.host, job.pid = item["host"], item["pid"]
            events.started(job.point.id, job.run_id, job.step)
            return None
        if kind == "progress":
            job.step = max(job.step, item["step"])
            events.advanced(job.point.id, job.step)
            return None
        sink = StoreSink(store, job.run_id)
        for row in item["rows"]:
            if row[0] == "scalars":
                sink.scalars(row[1], row[2])
                job.step = max(job.step, row[1])
            elif row[0] == "probe":
                sink.probe(row[1])
            else:
                sink.end(row[1], row[2], diverged_at=row[3])
        path = store.checkpoint_path(job.run_id)
        if kind == "rejected":  # the checkpoint it was sent changed on the way
            rejection = Rejection(None, None, item["what"], item["reason"])
            restart_after(store, job.run_id, rejection, job.point, events)
            job.step = 0
            return None
        if kind == "chunk":
            # Records first, then the checkpoint: a driver killed in between resumes
            # from the older checkpoint and rewrites the same rows (same keys).
            data = item["checkpoint"]
            if checkpoint_digest(data) == item["digest"]:
                job.digest = write_checkpoint(path, data, previous=job.digest)
            else:  # damaged on its way here: the previous one stays
                store.record_event(
                    job.run_id,
                    "checkpoint_damaged",
                    f"a checkpoint of run {job.run_id} ({job.point.name}) at step {job.step} "
                    "failed its digest check on arrival from its Ray task; not kept (the "
                    "run resumes from its previous checkpoint if it has to)",
                )
            events.advanced(job.point.id, job.step)
            return None
        outcome: PointOutcome = item["outcome"]
        if outcome.status in ("finished", "diverged"):  # a failed run may be resumed
            remove_checkpoint(path)
        return replace(outcome, run_id=job.run_id)
