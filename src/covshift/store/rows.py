"""The store's rows as Python values: what a run row holds, and how it is read and written.

:class:`RunInfo` is the one list of the ``runs`` table's columns: each field is a column,
in table order, and carries its SQL declaration, from which :mod:`covshift.store.schema`
writes the ``CREATE TABLE``. The queries select :data:`RUN_COLUMNS` and the insert of a
new run names the columns of :class:`NewRun`, so a column is added in one place.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Literal

from covshift._version import __version__

__all__ = [
    "FINAL_OUTCOMES",
    "RUN_COLUMNS",
    "RUN_STATUSES",
    "SELECT_RUNS",
    "Claim",
    "Event",
    "ExperimentPoint",
    "NewRun",
    "ProbeUnits",
    "RunInfo",
    "new_run_values",
    "now",
]

# ``running`` is a live (or killed) run; the others are final.
RUN_STATUSES = ("running", "finished", "diverged", "interrupted", "failed")
FINAL_OUTCOMES = ("finished", "diverged")  # measured outcomes: a point that has one is done

_STATUS_CHECK = ", ".join(f"'{s}'" for s in RUN_STATUSES)


def _column(sql: str) -> Any:
    """A field that is a column of ``runs``, declared as ``sql`` in its ``CREATE TABLE``."""
    return field(metadata={"sql": sql})


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table (fields in column order), config decoded."""

    id: int = _column("INTEGER PRIMARY KEY AUTOINCREMENT")
    name: str = _column("TEXT NOT NULL")
    preset: str | None = _column("TEXT")
    experiment: str | None = _column("TEXT")
    # The grid point's identity: unique, so a point is recorded at most once.
    point: str | None = _column("TEXT UNIQUE")
    # JSON, keys sorted. (_column returns a dataclass field, not a shared default.)
    config: dict[str, Any] = _column("TEXT NOT NULL")  # noqa: RUF009
    seed: int | None = _column("INTEGER")
    status: str = _column(f"TEXT NOT NULL CHECK (status IN ({_STATUS_CHECK}))")
    started_at: str = _column("TEXT NOT NULL")
    ended_at: str | None = _column("TEXT")
    last_step: int = _column("INTEGER NOT NULL DEFAULT 0")
    diverged_at: int | None = _column("INTEGER")
    python_version: str = _column("TEXT NOT NULL")
    torch_version: str | None = _column("TEXT")
    covshift_version: str = _column("TEXT NOT NULL")
    device: str | None = _column("TEXT")
    host: str | None = _column("TEXT")
    pid: int | None = _column("INTEGER")
    threads: int | None = _column("INTEGER")
    error: str | None = _column("TEXT")

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RunInfo:
        """The run of a row selected with :data:`SELECT_RUNS`."""
        values = dict(zip(RUN_COLUMNS, row, strict=True))
        values["config"] = json.loads(values["config"])
        return cls(**values)


RUN_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RunInfo))
# Every query of runs starts here, so rows always come in RunInfo's field order.
SELECT_RUNS = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"


@dataclass(frozen=True)
class NewRun:
    """What a new run row records, besides its status, times, versions and owner.

    Each field is the column of ``runs`` of the same name.
    """

    name: str
    config: Mapping[str, Any]
    seed: int | None = None
    preset: str | None = None
    experiment: str | None = None
    device: str | None = None
    torch_version: str | None = None
    point: str | None = None
    threads: int | None = None


assert {f.name for f in fields(NewRun)} <= set(RUN_COLUMNS)  # each field is a column


def now() -> str:
    """The current UTC time as the store records it (ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_values(run: NewRun) -> dict[str, Any]:
    """The column values of the row that records ``run``: its own fields, the status
    ``running``, the start time, the versions, and this process as its owner."""
    values: dict[str, Any] = {f.name: getattr(run, f.name) for f in fields(NewRun)}
    values["config"] = json.dumps(dict(run.config), sort_keys=True)
    values.update(
        status="running",
        started_at=now(),
        python_version=platform.python_version(),
        covshift_version=__version__,
        host=socket.gethostname(),
        pid=os.getpid(),
    )
    return values


@dataclass(frozen=True)
class Claim:
    """What :meth:`Store.claim_point` found and did.

    ``state``: ``new`` (a run row was created for the point), ``resume`` (an
    interrupted, failed or stale run of the point now belongs to this process), ``done``
    (the point is finished or diverged: nothing to run) or ``busy`` (a live process on
    this or another host is training it). ``run`` is the row after the claim.
    """

    state: Literal["new", "resume", "done", "busy"]
    run: RunInfo


@dataclass(frozen=True)
class ProbeUnits:
    """The axis that held the units of one probe record (see
    :mod:`covshift.probe.units`); None where the record did not say (recorded before
    schema 3, or not per unit)."""

    step: int
    dim: int | None  # the axis of the recorded values, 0 being the batch axis
    source: str | None  # given | layer | producer | only | assumed
    rule: str | None  # why, in words


@dataclass(frozen=True)
class ExperimentPoint:
    """One grid point of a recorded experiment: its identity and coordinates."""

    point: str
    position: int
    network: str
    seed: int
    axes: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """Something that happened to a run that its row does not say (a damaged checkpoint
    set aside and the run restarted): the ``events`` table's row."""

    id: int
    run_id: int | None
    at: str  # UTC, as :func:`now` writes it
    kind: str  # checkpoint_damaged | checkpoint_unverified
    path: str | None  # the file it concerns (where a damaged checkpoint was set aside)
    message: str
