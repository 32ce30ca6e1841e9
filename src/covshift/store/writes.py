"""Writing the store: runs (started, claimed, logged, closed) and experiments.

:class:`StoreWriter` is the writing half of :class:`~covshift.store.Store`. Every
write is its own transaction, taken with ``BEGIN IMMEDIATE`` (the write lock first, so
two processes never both read a state and then both act on it), so a crash or Ctrl-C
leaves what was recorded intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np

from covshift.store.errors import StoreError, storage_error
from covshift.store.guard import GuardedConnection
from covshift.store.ownership import held_elsewhere
from covshift.store.queries import StoreReader
from covshift.store.rows import (
    FINAL_OUTCOMES,
    RUN_STATUSES,
    SELECT_RUNS,
    Claim,
    ExperimentPoint,
    NewRun,
    RunInfo,
    new_run_values,
    now,
)

__all__ = ["StoreWriter"]


class StoreWriter(StoreReader):
    """The writes of a store (and, inherited, its queries)."""

    @contextmanager
    def _transaction(self) -> Iterator[GuardedConnection]:
        """One write transaction. A file that turns out read-only, a full disk or an
        I/O error raises the :class:`StoreError` that says so (SQLite opens a
        read-only file for reading without complaint, and a disk fills up at any
        write, the COMMIT included); the transaction is rolled back, if SQLite has not
        done so itself, and what was committed before stays."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error, StoreError):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            said = storage_error(self.path, e)
            if said is None:
                raise
            raise said from None

    # -- runs ----------------------------------------------------------------
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

    def _insert_run(self, db: GuardedConnection, run: NewRun) -> int:
        values = new_run_values(run)
        marks = ", ".join("?" * len(values))
        try:
            cur = db.execute(
                f"INSERT INTO runs ({', '.join(values)}) VALUES ({marks})", tuple(values.values())
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
            row = db.execute(f"{SELECT_RUNS} WHERE point = ?", (run.point,)).fetchone()
            if row is None:
                run_id = self._insert_run(db, run)
                state: Literal["new", "resume", "done", "busy"] = "new"
            else:
                found = RunInfo.from_row(row)
                run_id = found.id
                if found.status in FINAL_OUTCOMES:
                    state = "done"
                elif found.status == "running" and held_elsewhere(found):
                    state = "busy"
                else:
                    db.execute(
                        "UPDATE runs SET status = 'running', ended_at = NULL, error = NULL,"
                        " host = ?, pid = ?, device = COALESCE(?, device),"
                        " threads = COALESCE(threads, ?) WHERE id = ?",
                        (socket.gethostname(), os.getpid(), run.device, run.threads, run_id),
                    )
                    state = "resume"
            row = db.execute(f"{SELECT_RUNS} WHERE id = ?", (run_id,)).fetchone()
        return Claim(state, RunInfo.from_row(row))

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
                (status, now(), error, diverged_at, run_id),
            )

    def fail_stale_run(self, run: RunInfo, error: str) -> bool:
        """Mark ``run`` ``failed`` with ``error`` if it is still ``running`` under the
        same owner as when it was read (so a run claimed since is left alone); True if
        it was marked."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE runs SET status = 'failed', ended_at = ?, error = ?"
                " WHERE id = ? AND status = 'running' AND host IS ? AND pid IS ?",
                (now(), error, run.id, run.host, run.pid),
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

    def rewind_run(self, run_id: int, step: int) -> None:
        """Forget what run ``run_id`` recorded after ``step`` (its scalars and probe
        records), as a run restarted from the state of ``step`` (0: the start) is about
        to record them again; ``last_step`` goes back with them."""
        with self._transaction() as db:
            db.execute("DELETE FROM scalars WHERE run_id = ? AND step > ?", (run_id, step))
            db.execute("DELETE FROM probe_records WHERE run_id = ? AND step > ?", (run_id, step))
            db.execute(
                "UPDATE runs SET last_step = (SELECT COALESCE(MAX(step), 0) FROM scalars"
                " WHERE run_id = ?) WHERE id = ?",
                (run_id, run_id),
            )

    def record_event(
        self, run_id: int | None, kind: str, message: str, path: str | None = None
    ) -> int:
        """Record what happened to a run that its row does not say (see
        :mod:`covshift.store.schema`, version 4); returns the event's id."""
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO events (run_id, at, kind, path, message) VALUES (?, ?, ?, ?, ?)",
                (run_id, now(), kind, path, message),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    # -- experiments ---------------------------------------------------------
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
                (experiment_id, name, json.dumps(dict(config), sort_keys=True), now()),
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
