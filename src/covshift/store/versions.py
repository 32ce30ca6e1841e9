"""What a store of each schema version holds: its tables, their columns and keys, and
its indexes (see :mod:`covshift.store.schema` for what each version added).

Written out version by version, not derived from the current ``CREATE TABLE``s:
they are what files written by older covshift hold, whatever the code becomes (a
test checks that the current version's promise is exactly what a new store gets).
:mod:`covshift.store.damage` checks an opened file against its version's promise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Index", "Promise", "Table", "promise"]


@dataclass(frozen=True)
class Table:
    """A table: its columns, and the column sets that must be unique (its primary key
    and UNIQUE constraints; an ``INTEGER PRIMARY KEY`` is the one-column key ``id``)."""

    columns: tuple[str, ...]
    keys: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Index:
    """A named index (``CREATE INDEX``): the table and columns it covers."""

    table: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Promise:
    """What a store of one schema version holds."""

    version: int
    tables: Mapping[str, Table]
    indexes: Mapping[str, Index] = field(default_factory=dict)


_V1_RUNS = (
    "id name preset experiment config seed status started_at ended_at last_step"
    " python_version torch_version covshift_version device host pid error"
).split()
_V2_RUNS = (
    "id name preset experiment point config seed status started_at ended_at last_step"
    " diverged_at python_version torch_version covshift_version device host pid threads"
    " error"
).split()
_PROBE_V1 = ("run_id", "layer", "stat", "step", "dtype", "shape", "data")
_PROBE_KEY = (("run_id", "layer", "stat", "step"),)

_V1 = {
    "meta": Table(("key", "value"), (("key",),)),
    "runs": Table(tuple(_V1_RUNS), (("id",),)),
    "scalars": Table(("run_id", "name", "step", "value"), (("run_id", "name", "step"),)),
    "probe_records": Table(_PROBE_V1, _PROBE_KEY),
}
_V2 = {
    **_V1,
    "runs": Table(tuple(_V2_RUNS), (("id",), ("point",))),
    "experiments": Table(("id", "name", "config", "created_at"), (("id",),)),
    "experiment_points": Table(
        ("experiment", "point", "position", "network", "seed", "axes"),
        (("experiment", "point"),),
    ),
}
_V3 = {
    **_V2,
    "probe_records": Table((*_PROBE_V1, "unit_dim", "unit_source", "unit_rule"), _PROBE_KEY),
}
_V4 = {
    **_V3,
    "events": Table(("id", "run_id", "at", "kind", "path", "message"), (("id",),)),
}
_V2_INDEXES = {"runs_experiment": Index("runs", ("experiment",))}
_V4_INDEXES = {**_V2_INDEXES, "events_run": Index("events", ("run_id",))}

_PROMISES = {
    1: Promise(1, _V1),
    2: Promise(2, _V2, _V2_INDEXES),
    3: Promise(3, _V3, _V2_INDEXES),
    4: Promise(4, _V4, _V4_INDEXES),
}


def promise(version: int) -> Promise:
    """What a store of schema ``version`` holds (0, a version-1 store that lost its
    version row, is version 1)."""
    return _PROMISES[max(version, 1)]
