"""The results store: one SQLite database for every run (WAL mode, versioned schema).

The store knows nothing about torch: it takes Python scalars and numpy arrays. Every
write is its own transaction, so a crash or Ctrl-C leaves what was recorded intact,
and a run that ends early is marked ``interrupted`` or ``failed``, never left as
``running`` (unless the process is killed outright; :meth:`Store.runs` then reports
it as ``stale`` once its process is gone). Many processes may write one store at
once (WAL; each transaction takes the write lock with ``BEGIN IMMEDIATE``).

Tables (see :mod:`covshift.store.schema` for the columns and the migrations):
    meta(key, value)                      schema_version, created_by
    runs(...)                             one row per run; ``point`` unique
    scalars(run_id, name, step, value)    loss, test accuracy, ...
    probe_records(run_id, layer, stat, step, dtype, shape, data,
                  unit_dim, unit_source, unit_rule)
                                          one numpy array per (layer, statistic, step),
                                          with the axis that held the record's units
    experiments(id, name, config, created_at)
    experiment_points(experiment, point, position, network, seed, axes)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from covshift._version import __version__
from covshift.store.schema import RUN_COLUMNS, RUN_STATUSES, SCHEMA_VERSION, migrate, stored_version

__all__ = [
    "DEFAULT_DB",
    "FINAL_OUTCOMES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Claim",
    "ExperimentPoint",
    "NewRun",
    "ProbeUnits",
    "RunInfo",
    "Store",
    "StoreError",
    "pid_alive",
]

DEFAULT_DB = Path("covshift-out") / "covshift.db"
FINAL_OUTCOMES = ("finished", "diverged")  # measured outcomes: a point that has one is done


class StoreError(Exception):
    """The database cannot be used (newer schema, not a covshift store, unknown run)."""


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table (fields in column order), config decoded."""

    id: int
    name: str
    preset: str | None
    experiment: str | None
    point: str | None
    config: dict[str, Any]
    seed: int | None
    status: str
    started_at: str
    ended_at: str | None
    last_step: int
    diverged_at: int | None
    python_version: str
    torch_version: str | None
    covshift_version: str
    device: str | None
    host: str | None
    pid: int | None
    threads: int | None
    error: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RunInfo:
        values = dict(zip(RUN_COLUMNS, row, strict=True))
        values["config"] = json.loads(values["config"])
        return cls(**values)


assert tuple(f.name for f in fields(RunInfo)) == RUN_COLUMNS  # one list of columns


@dataclass(frozen=True)
class NewRun:
    """What a new run row records, besides its status, times, versions and owner."""

    name: str
    config: Mapping[str, Any]
    seed: int | None = None
    preset: str | None = None
    experiment: str | None = None
    device: str | None = None
    torch_version: str | None = None
    point: str | None = None
    threads: int | None = None


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (a killed
    process whose parent has not reaped it yet still answers ``kill(pid, 0)``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


class Store:
    """A covshift results database.

    Args:
        path: the SQLite file (created with its folder if missing).
        create: False to open only an existing store (reading commands never create
            one); raises :class:`StoreError` when there is none.

    Example:
        >>> store = Store(tmp_path / "covshift.db")
        >>> run = store.start_run("demo", config={"lr": 0.1}, seed=0)
        >>> store.log_scalars(run, step=10, values={"loss": 0.5})
        >>> store.finish_run(run, "finished")
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DB, *, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder; give the path of a .db file")
        if not create and not self.path.is_file():
            raise StoreError(f"no store at {self.path}")
        if not create and self.path.stat().st_size == 0:
            # Reading commands never write: an empty file is not made into a store.
            raise StoreError(f"{self.path} is an empty file, not a covshift store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across application crashes in WAL mode; only a power
            # loss can drop the last transactions, and never corrupts the file.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._check_and_migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable SQLite database ({e})") from None

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _check_and_migrate(self) -> None:
        tables = {
            r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if tables and "meta" not in tables:
            raise StoreError(
                f"{self.path}: an SQLite file, but not a covshift store "
                f"(tables: {', '.join(sorted(tables))})"
            )
        version = stored_version(self._db)
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this covshift "
                f"({__version__}, schema {SCHEMA_VERSION}); upgrade covshift to read it"
            )
        if version != SCHEMA_VERSION:
            migrate(self._db)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('created_by', ?)", (f"covshift {__version__}",)
            )
        # A random identity, so files kept beside the store (checkpoints) can tell
        # their store from another one in the same folder or a recreated one.
        query = "SELECT value FROM meta WHERE key = 'store_id'"
        if self._db.execute(query).fetchone() is None:
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,)
            )
        self.store_id: str = self._db.execute(query).fetchone()[0]

    def checkpoint_path(self, run_id: int) -> Path:
        """Where the resumable state of run ``run_id`` is kept while it trains: beside
        the store, named after the store's identity and the run."""
        return self.path.parent / "checkpoints" / f"{self.store_id[:12]}-run-{run_id}.pt"

    def checkpoint_owner(self, run_id: int) -> str:
        """The identity a checkpoint of run ``run_id`` records, checked when it is loaded
        (the file name alone would not catch a copied or renamed file)."""
        return f"store {self.store_id}/run {run_id}"

    # -- writing: runs -------------------------------------------------------
    def start_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any],
        seed: int | None = None,
        preset: str | None = None,
        experiment: str | None = None,
        device: str | None = None,
        torch_version: str | None = None,
        point: str | None = None,
        threads: int | None = None,
    ) -> int:
        """Record a new run with status ``running``; returns its id."""
        run = NewRun(name, config, seed, preset, experiment, device, torch_version, point, threads)
        with self._transaction() as db:
            return self._insert_run(db, run)

    def _insert_run(self, db: sqlite3.Connection, run: NewRun) -> int:
        try:
            cur = db.execute(
                "INSERT INTO runs (name, preset, experiment, point, config, seed, status,"
                " started_at, python_version, torch_version, covshift_version, device, host,"
                " pid, threads) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.name,
                    run.preset,
                    run.experiment,
                    run.point,
                    json.dumps(dict(run.config), sort_keys=True),
                    run.seed,
                    _now(),
                    platform.python_version(),
                    run.torch_version,
                    __version__,
                    run.device,
                    socket.gethostname(),
                    os.getpid(),
                    run.threads,
                ),
            )
        except OverflowError:
            raise StoreError(
                f"seed {run.seed} does not fit the store's integer type; use 0 <= seed < 2**63"
            ) from None
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def claim_point(self, run: NewRun) -> Claim:
        """Take ownership of the run of grid point ``run.point`` for this process.

        In one write transaction, so among processes that claim one point at the same
        time exactly one gets ``new`` or ``resume`` (the others see ``busy``): a point
        with no run gets one (recorded from ``run``); a finished or diverged one is
        ``done``; a run left ``interrupted``, ``failed`` or ``running`` by a process that
        is gone (stale) is handed over; a run a live process is training is ``busy``. A
        resumed run keeps its recorded thread count.
        """
        if run.point is None:
            raise ValueError("claim_point needs the run's grid point (NewRun.point)")
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE point = ?", (run.point,)
            ).fetchone()
            if row is None:
                run_id = self._insert_run(db, run)
                state: Literal["new", "resume", "done", "busy"] = "new"
            else:
                found = RunInfo.from_row(row)
                run_id = found.id
                if found.status in FINAL_OUTCOMES:
                    state = "done"
                elif found.status == "running" and self._held_elsewhere(found):
                    state = "busy"
                else:
                    db.execute(
                        "UPDATE runs SET status = 'running', ended_at = NULL, error = NULL,"
                        " host = ?, pid = ?, device = COALESCE(?, device),"
                        " threads = COALESCE(threads, ?) WHERE id = ?",
                        (socket.gethostname(), os.getpid(), run.device, run.threads, run_id),
                    )
                    state = "resume"
            row = db.execute(
                f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
        return Claim(state, RunInfo.from_row(row))

    @staticmethod
    def _held_elsewhere(run: RunInfo) -> bool:
        """Whether another process may still be training ``run`` (a process on another
        host cannot be checked, so it counts as alive; this process is the owner)."""
        if run.host != socket.gethostname() or not run.pid:
            return True
        return run.pid != os.getpid() and pid_alive(run.pid)

    def log_scalars(self, run_id: int, step: int, values: Mapping[str, float]) -> None:
        """Record scalar series values at ``step`` (one transaction)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO scalars (run_id, name, step, value) VALUES (?, ?, ?, ?)",
                [(run_id, name, step, float(v)) for name, v in values.items()],
            )
            db.execute("UPDATE runs SET last_step = MAX(last_step, ?) WHERE id = ?", (step, run_id))

    def log_probe(
        self,
        run_id: int,
        step: int,
        layer: str,
        stats: Mapping[str, np.ndarray],
        *,
        unit_dim: int | None = None,
        unit_source: str | None = None,
        unit_rule: str | None = None,
    ) -> None:
        """Record one probe record: named arrays (per-unit statistics) of ``layer``, and
        the axis of the layer's values that held the units (``unit_dim``), how it was
        found (``unit_source``) and why (``unit_rule``): a ``ProbeRecord.unit_axis``."""
        units = (None if unit_dim is None else int(unit_dim), unit_source, unit_rule)
        rows = []
        for stat, array in stats.items():
            a = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            shape = json.dumps(list(a.shape))
            rows.append((run_id, layer, stat, step, a.dtype.str, shape, a.tobytes(), *units))
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO probe_records (run_id, layer, stat, step, dtype, shape,"
                " data, unit_dim, unit_source, unit_rule) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def reopen_run(self, run_id: int) -> None:
        """Mark an interrupted or failed run as ``running`` again (it is being resumed)."""
        run = self.run(run_id)
        if run.status in FINAL_OUTCOMES:
            raise StoreError(f"run {run_id} is {run.status}; there is nothing to resume")
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status = 'running', ended_at = NULL, error = NULL,"
                " host = ?, pid = ? WHERE id = ?",
                (socket.gethostname(), os.getpid(), run_id),
            )

    def finish_run(
        self,
        run_id: int,
        status: str,
        error: str | None = None,
        *,
        diverged_at: int | None = None,
    ) -> None:
        """Close a run as ``finished``, ``diverged`` (with ``diverged_at``, the step the
        divergence rule fired), ``interrupted`` or ``failed``."""
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES[1:])}, got {status!r}")
        if (status == "diverged") != (diverged_at is not None):
            raise ValueError("diverged_at is given exactly when the status is 'diverged'")
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status = ?, ended_at = ?, error = ?, diverged_at = ? WHERE id = ?",
                (status, _now(), error, diverged_at, run_id),
            )

    def fail_stale_run(self, run: RunInfo, error: str) -> bool:
        """Mark ``run`` ``failed`` with ``error`` if it is still ``running`` under the
        same owner as when it was read (so a run claimed since is left alone); True if
        it was marked."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE runs SET status = 'failed', ended_at = ?, error = ?"
                " WHERE id = ? AND status = 'running' AND host IS ? AND pid IS ?",
                (_now(), error, run.id, run.host, run.pid),
            )
            return cur.rowcount == 1

    def delete_stale_run(self, run: RunInfo) -> bool:
        """Delete ``run`` with its scalars and probe records (on the same condition as
        :meth:`fail_stale_run`); True if it was deleted."""
        with self._transaction() as db:
            cur = db.execute(
                "DELETE FROM runs WHERE id = ? AND status = 'running' AND host IS ? AND pid IS ?",
                (run.id, run.host, run.pid),
            )
            return cur.rowcount == 1

    def adopt_point(self, run_id: int, point: str) -> bool:
        """Give a run without a point (recorded by schema 1) the identity ``point``,
        unless another run holds it; True if it was given."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE runs SET point = ? WHERE id = ? AND point IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM runs WHERE point = ?)",
                (point, run_id, point),
            )
            return cur.rowcount == 1

    # -- writing: experiments ------------------------------------------------
    def save_experiment(
        self,
        experiment_id: str,
        name: str,
        config: Mapping[str, Any],
        points: Sequence[ExperimentPoint],
    ) -> None:
        """Record an experiment's configuration and grid (idempotent: the id is a hash
        of the configuration, so saving it again changes nothing)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO experiments (id, name, config, created_at)"
                " VALUES (?, ?, ?, ?)",
                (experiment_id, name, json.dumps(dict(config), sort_keys=True), _now()),
            )
            db.executemany(
                "INSERT OR IGNORE INTO experiment_points"
                " (experiment, point, position, network, seed, axes) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        experiment_id,
                        p.point,
                        p.position,
                        p.network,
                        p.seed,
                        json.dumps(p.axes, sort_keys=True),
                    )
                    for p in points
                ],
            )

    # -- reading -------------------------------------------------------------
    def _stale_marked(self, run: RunInfo) -> RunInfo:
        """``run`` with status ``stale`` if it is marked running by a dead process here."""
        if (
            run.status == "running"
            and run.host == socket.gethostname()
            and run.pid
            and run.pid != os.getpid()
            and not pid_alive(run.pid)
        ):
            return replace(run, status="stale")
        return run

    def _select_runs(self, where: str = "", args: Sequence[Any] = ()) -> list[RunInfo]:
        rows = self._db.execute(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM runs {where} ORDER BY id DESC", tuple(args)
        ).fetchall()
        return [self._stale_marked(RunInfo.from_row(r)) for r in rows]

    def runs(self, experiment: str | None = None) -> list[RunInfo]:
        """All runs, newest first (optionally those of one experiment: the runs of its
        grid points, and legacy runs recorded with its id).

        A run still marked ``running`` whose process is gone on this host is reported
        with status ``stale`` (it was killed without a chance to close itself).
        """
        if experiment is None:
            return self._select_runs()
        return self._select_runs(
            "WHERE experiment = ? OR point IN"
            " (SELECT point FROM experiment_points WHERE experiment = ?)",
            (experiment, experiment),
        )

    def run(self, run_id: int) -> RunInfo:
        found = self._select_runs("WHERE id = ?", (run_id,))
        if not found:
            raise StoreError(f"{self.path}: no run with id {run_id}")
        return found[0]

    def runs_of_points(self, points: Sequence[str]) -> dict[str, RunInfo]:
        """The run recorded for each of ``points`` that has one."""
        out: dict[str, RunInfo] = {}
        chunk = 500  # SQLite's limit on bound parameters is 999 on old builds
        for i in range(0, len(points), chunk):
            part = list(points[i : i + chunk])
            marks = ", ".join("?" * len(part))
            for run in self._select_runs(f"WHERE point IN ({marks})", part):
                out[run.point] = run  # type: ignore[index]
        return out

    def experiment_config(self, experiment_id: str) -> dict[str, Any] | None:
        """The configuration an experiment was saved with (None: not recorded)."""
        row = self._db.execute(
            "SELECT config FROM experiments WHERE id = ?", (experiment_id,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def experiment_points(self, experiment_id: str) -> list[ExperimentPoint]:
        """The grid of a recorded experiment, in grid order."""
        rows = self._db.execute(
            "SELECT point, position, network, seed, axes FROM experiment_points"
            " WHERE experiment = ? ORDER BY position",
            (experiment_id,),
        ).fetchall()
        return [ExperimentPoint(p, pos, n, s, json.loads(a)) for p, pos, n, s, a in rows]

    def experiments(self) -> list[tuple[str, str, str]]:
        """``(id, name, created_at)`` of every recorded experiment, newest first."""
        return [
            tuple(r)  # type: ignore[misc]
            for r in self._db.execute(
                "SELECT id, name, created_at FROM experiments ORDER BY created_at DESC, id"
            )
        ]

    def scalars(self, run_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one scalar series, ordered by step."""
        rows = self._db.execute(
            "SELECT step, value FROM scalars WHERE run_id = ? AND name = ? ORDER BY step",
            (run_id, name),
        ).fetchall()
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        values = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        return steps, values

    def scalar_names(self, run_id: int) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT name FROM scalars WHERE run_id = ? ORDER BY name", (run_id,)
        )
        return [r[0] for r in rows]

    def probe_layers(self, run_id: int) -> list[str]:
        """Layers with probe records, in the order they were first recorded."""
        rows = self._db.execute(
            "SELECT layer, MIN(rowid) AS first FROM probe_records WHERE run_id = ?"
            " GROUP BY layer ORDER BY first",
            (run_id,),
        )
        return [r[0] for r in rows]

    def probe_stats(self, run_id: int, layer: str) -> list[str]:
        """The statistics recorded for ``layer`` in a run, sorted."""
        rows = self._db.execute(
            "SELECT DISTINCT stat FROM probe_records WHERE run_id = ? AND layer = ? ORDER BY stat",
            (run_id, layer),
        )
        return [r[0] for r in rows]

    def probe_units(self, run_id: int, layer: str) -> list[ProbeUnits]:
        """Per record of ``layer`` (by step): the axis that held its units and how it
        was found. Records made before schema 3 (and records that are not per unit)
        have None there."""
        rows = self._db.execute(
            "SELECT step, MIN(unit_dim), MIN(unit_source), MIN(unit_rule) FROM probe_records"
            " WHERE run_id = ? AND layer = ? GROUP BY step ORDER BY step",
            (run_id, layer),
        ).fetchall()
        return [ProbeUnits(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def probe(self, run_id: int, layer: str, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)``: one statistic of one layer over its records, stacked to
        shape ``(records, *per_record_shape)``."""
        rows = self._db.execute(
            "SELECT step, dtype, shape, data FROM probe_records"
            " WHERE run_id = ? AND layer = ? AND stat = ? ORDER BY step",
            (run_id, layer, stat),
        ).fetchall()
        if not rows:
            raise StoreError(
                f"{self.path}: run {run_id} has no probe records of {layer!r}/{stat!r}"
            )
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        arrays = [np.frombuffer(r[3], dtype=np.dtype(r[1])).reshape(json.loads(r[2])) for r in rows]
        return steps, np.stack(arrays)
