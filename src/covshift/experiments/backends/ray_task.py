"""What runs inside a Ray task of the Ray backend (:mod:`.ray_backend`): one point
trained into a buffer, its records and checkpoints streamed back chunk by chunk.

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
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from covshift.checkpoints import BytesCheckpointer, Rejection, checkpoint_digest
from covshift.data import Dataset
from covshift.experiments.backends.base import ProgressReporter
from covshift.experiments.grid import PointSpec
from covshift.experiments.point import PointOutcome, train_point
from covshift.probe import ProbeRecord
from covshift.training import resolve_device

__all__ = ["point_task"]


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
    def __init__(self, out: queue_module.Queue[Any]) -> None:
        self.out = out

    def started(self, point_id: str, run_id: int, step: int) -> None:
        pass

    def advanced(self, point_id: str, step: int) -> None:
        self.out.put(("progress", step, None))

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

    def saved(data: bytes) -> None:
        out.put(("chunk", buffer.take(), (data, checkpoint_digest(data))))

    def rejected(rejection: Rejection) -> None:
        out.put(("rejected", [], (rejection.kind, rejection.reason)))

    keeper = BytesCheckpointer(
        checkpoint, on_save=saved, owner=owner, digest=digest, on_rejected=rejected
    )

    def work() -> None:
        try:
            dataset = _task_dataset(data, data_key, resolve_device(spec.device))
            outcome = train_point(
                spec,
                dataset,
                buffer,
                checkpoint=keeper,
                background=False,
                callbacks=(ProgressReporter(spec.identity(), _TaskEvents(out), interval=1.0),),
            )
            out.put(("done", buffer.take(), outcome))
        except BaseException as e:
            out.put(("error", buffer.take(), e))

    # Training runs in a thread so that this generator can yield while it goes on.
    threading.Thread(target=work, name="covshift-point", daemon=True).start()
    yield {"kind": "hello", "host": socket.gethostname(), "pid": os.getpid()}
    while True:
        kind, rows, payload = out.get()
        if kind == "progress":
            yield {"kind": "progress", "step": rows}
        elif kind == "chunk":
            yield {"kind": "chunk", "rows": rows, "checkpoint": payload[0], "digest": payload[1]}
        elif kind == "rejected":
            yield {"kind": "rejected", "what": payload[0], "reason": payload[1]}
        elif kind == "done":
            yield {"kind": "done", "rows": rows, "outcome": payload}
            return
        else:
            raise payload
