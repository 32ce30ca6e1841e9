"""A batch of points as one Ray task: the members of one batched model.

The task is :func:`~covshift.experiments.backends.ray_tasks._point_task` for a
batch: it gets every member's spec and last checkpoint (bytes), trains them together
(:func:`~covshift.experiments.point_members.train_point_members`), and streams back,
per member, the records made since its last checkpoint together with its new
checkpoint (``"member": i`` in each chunk), then every member's outcome. The driver
applies a member's chunk to that member's run exactly as it applies a single point's.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from covshift.checkpoints import BytesCheckpointer
from covshift.experiments.backends.base import ProgressReporter
from covshift.experiments.backends.ray_tasks import _Buffer, _task_dataset
from covshift.experiments.grid import PointSpec
from covshift.experiments.point import PointOutcome
from covshift.experiments.point_members import train_point_members
from covshift.train import resolve_device

__all__ = ["group_task"]


class _MemberEvents:
    """Progress of member ``i``, to the task's queue."""

    def __init__(self, out: queue_module.Queue[Any], i: int) -> None:
        self.out = out
        self.i = i

    def started(self, point_id: str, run_id: int, step: int) -> None:
        pass

    def advanced(self, point_id: str, step: int) -> None:
        self.out.put(("progress", self.i, step, None))

    def ended(self, outcome: PointOutcome) -> None:
        pass


def group_task(
    specs: Sequence[PointSpec],
    data: list[Any],
    data_key: str,
    checkpoints: Sequence[bytes | None],
    threads: int,
    owners: Sequence[str | None],
) -> Iterator[dict[str, Any]]:
    """Train ``specs`` as one batch; yield each member's records and checkpoints."""
    torch.set_num_threads(threads)
    out: queue_module.Queue[Any] = queue_module.Queue()
    buffers = [_Buffer() for _ in specs]

    def keeper(i: int) -> BytesCheckpointer:
        def on_save(b: bytes) -> None:
            out.put(("chunk", i, buffers[i].take(), b))

        return BytesCheckpointer(checkpoints[i], on_save=on_save, owner=owners[i])

    def work() -> None:
        try:
            dataset = _task_dataset(data, data_key, resolve_device(specs[0].device))
            outcomes = train_point_members(
                specs,
                dataset,
                buffers,
                checkpoints=[keeper(i) for i in range(len(specs))],
                background=False,
                callbacks=[
                    (ProgressReporter(s.identity(), _MemberEvents(out, i), interval=1.0),)
                    for i, s in enumerate(specs)
                ],
            )
            out.put(("done", None, [b.take() for b in buffers], outcomes))
        except BaseException as e:
            out.put(("error", None, [b.take() for b in buffers], e))

    threading.Thread(target=work, name="covshift-batch", daemon=True).start()
    yield {"kind": "hello", "host": socket.gethostname(), "pid": os.getpid()}
    while True:
        kind, member, rows, payload = out.get()
        if kind == "progress":
            yield {"kind": "progress", "member": member, "step": rows}
        elif kind == "chunk":
            yield {"kind": "chunk", "member": member, "rows": rows, "checkpoint": payload}
        elif kind == "done":
            for i, (member_rows, outcome) in enumerate(zip(rows, payload, strict=True)):
                yield {"kind": "done", "member": i, "rows": member_rows, "outcome": outcome}
            return
        else:
            raise payload
