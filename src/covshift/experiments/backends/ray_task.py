"""What runs inside a Ray task of the Ray backend (:mod:`.ray_backend`): one point
(:func:`point_task`), or a batch of points trained as the members of one batched model
(:func:`members_task`), trained into buffers, their records and checkpoints streamed
back chunk by chunk (a batch's chunks say whose they are: ``"member": i``).

The task needs nothing from the driver's disk: the dataset comes from Ray's object
store (fetched once per worker process), the point's spec and last checkpoint come as
arguments, and training runs in a thread so that the generator can yield what it
records while it goes on.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from covshift.checkpoints import BytesCheckpointer, Rejection, checkpoint_digest
from covshift.data import Dataset
from covshift.experiments.backends.base import ProgressReporter
from covshift.experiments.grid import PointSpec
from covshift.experiments.point import PointOutcome, train_point
from covshift.experiments.point_members import train_point_members
from covshift.probe import ProbeRecord
from covshift.training import resolve_device

__all__ = ["members_task", "point_task"]


def _ray() -> Any:
    import ray

    return ray


class _Buffer:
    """A :class:`PointSink` that keeps rows until the next chunk is sent."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self.lock:
            self.rows.append(("scalars", step, dict(values)))

    def probe(self, record: ProbeRecord) -> None:
        with self.lock:
            self.rows.append(("probe", record))

    def end(self, status: str, error: str | None = None, diverged_at: int | None = None) -> None:
        with self.lock:
            self.rows.append(("end", status, error, diverged_at))

    def take(self) -> list[tuple[Any, ...]]:
        with self.lock:
            rows, self.rows = self.rows, []
        return rows


class _TaskEvents:
    """Progress of the task's point (of member ``member`` of a batch), to its queue."""

    def __init__(self, out: queue_module.Queue[Any], member: int = 0) -> None:
        self.out = out
        self.member = member

    def started(self, point_id: str, run_id: int, step: int) -> None:
        pass

    def advanced(self, point_id: str, step: int) -> None:
        self.out.put(("progress", self.member, step, None))

    def ended(self, outcome: PointOutcome) -> None:
        pass

    def note(self, point_id: str, text: str) -> None:
        pass


_TASK_DATA: dict[str, Dataset] = {}  # per Ray worker process: datasets by object id


def _task_dataset(holder: list[Any], key: str, device: torch.device) -> Dataset:
    """The dataset of ``holder[0]`` (an ObjectRef, wrapped so Ray does not resolve it
    for every task), fetched and copied to torch once per worker process."""
    cache_key = f"{key}@{device}"
    if cache_key not in _TASK_DATA:
        arrays = _ray().get(holder[0])
        if "text" in arrays:  # a TextDataset pickles as its byte streams
            _TASK_DATA[cache_key] = arrays["text"].to(device)
            return _TASK_DATA[cache_key]
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays["tensors"].items()}
        _TASK_DATA[cache_key] = Dataset(**arrays["fields"], **tensors).to(device)
    return _TASK_DATA[cache_key]


def _keeper(
    out: queue_module.Queue[Any],
    buffer: _Buffer,
    member: int,
    checkpoint: bytes | None,
    owner: str | None,
    digest: str | None,
) -> BytesCheckpointer:
    """The checkpointer of one point: each save goes to the queue with the rows
    recorded since the last (and its digest); a rejected checkpoint is reported."""

    def saved(data: bytes) -> None:
        out.put(("chunk", member, buffer.take(), (data, checkpoint_digest(data))))

    def rejected(rejection: Rejection) -> None:
        out.put(("rejected", member, [], (rejection.kind, rejection.reason)))

    return BytesCheckpointer(
        checkpoint, on_save=saved, owner=owner, digest=digest, on_rejected=rejected
    )


def _stream(
    train: Callable[[], list[PointOutcome]], out: queue_module.Queue[Any], buffers: list[_Buffer]
) -> Iterator[dict[str, Any]]:
    """Run ``train`` in a thread (so that this generator can yield while it goes on)
    and yield what it puts on ``out``, then every point's outcome."""

    def work() -> None:
        try:
            outcomes = train()
            out.put(("done", None, [b.take() for b in buffers], outcomes))
        except BaseException as e:
            out.put(("error", None, [], e))

    threading.Thread(target=work, name="covshift-point", daemon=True).start()
    yield {"kind": "hello", "host": socket.gethostname(), "pid": os.getpid()}
    while True:
        kind, member, rows, payload = out.get()
        if kind == "progress":
            yield {"kind": "progress", "member": member, "step": rows}
        elif kind == "chunk":
            yield {
                "kind": "chunk",
                "member": member,
                "rows": rows,
                "checkpoint": payload[0],
                "digest": payload[1],
            }
        elif kind == "rejected":
            yield {"kind": "rejected", "member": member, "what": payload[0], "reason": payload[1]}
        elif kind == "done":
            for i, (member_rows, outcome) in enumerate(zip(rows, payload, strict=True)):
                yield {"kind": "done", "member": i, "rows": member_rows, "outcome": outcome}
            return
        else:
            raise payload


def point_task(
    spec: PointSpec,
    data: list[Any],
    data_key: str,
    checkpoint: bytes | None,
    threads: int,
    owner: str | None = None,
    digest: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Train one point; yield its records and checkpoints, chunk by chunk. ``owner``:
    the run's checkpoint identity (a checkpoint of another run is refused); ``digest``:
    the SHA-256 of ``checkpoint`` as the driver verified it (bytes that changed on the
    way are not resumed from: the task says so and starts from step 0). Each chunk's
    checkpoint travels with its digest, which the driver checks before keeping it."""
    torch.set_num_threads(threads)
    out: queue_module.Queue[Any] = queue_module.Queue()
    buffer = _Buffer()
    keeper = _keeper(out, buffer, 0, checkpoint, owner, digest)

    def train() -> list[PointOutcome]:
        dataset = _task_dataset(data, data_key, resolve_device(spec.device))
        outcome = train_point(
            spec,
            dataset,
            buffer,
            checkpoint=keeper,
            background=False,
            callbacks=(ProgressReporter(spec.identity(), _TaskEvents(out), interval=1.0),),
        )
        return [outcome]

    yield from _stream(train, out, [buffer])


def members_task(
    specs: Sequence[PointSpec],
    data: list[Any],
    data_key: str,
    checkpoints: Sequence[bytes | None],
    threads: int,
    owners: Sequence[str | None],
    digests: Sequence[str | None],
) -> Iterator[dict[str, Any]]:
    """:func:`point_task` for a batch: ``specs`` trained together as the members of
    one batched model (:func:`~covshift.experiments.point_members.train_point_members`),
    each with its own checkpoint, owner and digest, verified as a single point's is;
    every chunk says which member it is of (``"member": i``)."""
    torch.set_num_threads(threads)
    out: queue_module.Queue[Any] = queue_module.Queue()
    buffers = [_Buffer() for _ in specs]
    keepers = [
        _keeper(out, buffers[i], i, checkpoints[i], owners[i], digests[i])
        for i in range(len(specs))
    ]

    def train() -> list[PointOutcome]:
        dataset = _task_dataset(data, data_key, resolve_device(specs[0].device))
        return train_point_members(
            specs,
            dataset,
            buffers,
            checkpoints=keepers,
            background=False,
            callbacks=[
                (ProgressReporter(s.identity(), _TaskEvents(out, i), interval=1.0),)
                for i, s in enumerate(specs)
            ],
        )

    yield from _stream(train, out, buffers)
