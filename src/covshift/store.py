"""The results store: one SQLite database for every run (WAL mode, versioned schema).

The store knows nothing about torch: it takes Python scalars and numpy arrays. Every
write is its own transaction, so a crash or Ctrl-C leaves what was recorded intact,
and a run that ends early is marked ``interrupted`` or ``failed``, never left as
``running`` (unless the process is killed outright; :meth:`Store.runs` then reports
it as ``stale`` once its process is gone).

Tables:
    meta(key, value)                      schema_version, created_by
    runs(id, name, preset, experiment, config, seed, status, started_at, ended_at,
         last_step, python_version, torch_version, covshift_version, device, host, pid,
         error)
    scalars(run_id, name, step, value)    loss, test accuracy, ...
    probe_records(run_id, layer, stat, step, dtype, shape, data)
                                          one numpy array per (layer, statistic, step)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from covshift._version import __version__

__all__ = ["DEFAULT_DB", "RUN_STATUSES", "SCHEMA_VERSION", "RunInfo", "Store", "StoreError"]

SCHEMA_VERSION = 1
DEFAULT_DB = Path("covshift-out") / "covshift.db"
RUN_STATUSES = ("running", "finished", "interrupted", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    preset TEXT,
    experiment TEXT,
    config TEXT NOT NULL,
    seed INTEGER,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'interrupted', 'failed')),
    started_at TEXT NOT NULL,
    ended_at TEXT,
    last_step INTEGER NOT NULL DEFAULT 0,
    python_version TEXT NOT NULL,
    torch_version TEXT,
    covshift_version TEXT NOT NULL,
    device TEXT,
    host TEXT,
    pid INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_experiment ON runs (experiment);
CREATE TABLE IF NOT EXISTS scalars (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    step INTEGER NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, name, step)
);
CREATE TABLE IF NOT EXISTS probe_records (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    layer TEXT NOT NULL,
    stat TEXT NOT NULL,
    step INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, layer, stat, step)
);
"""


class StoreError(Exception):
    """The database cannot be used (newer schema, not a covshift store, unknown run)."""


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table, config decoded."""

    id: int
    name: str
    preset: str | None
    experiment: str | None
    config: dict[str, Any]
    seed: int | None
    status: str
    started_at: str
    ended_at: str | None
    last_step: int
    python_version: str
    torch_version: str | None
    covshift_version: str
    device: str | None
    host: str | None
    pid: int | None
    error: str | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A covshift results database.

    Args:
        path: the SQLite file (created with its folder if missing).

    Example:
        >>> store = Store(tmp_path / "covshift.db")
        >>> run = store.start_run("demo", config={"lr": 0.1}, seed=0)
        >>> store.log_scalars(run, step=10, values={"loss": 0.5})
        >>> store.finish_run(run, "finished")
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DB) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder; give the path of a .db file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable SQLite database ({e})") from None
        # NORMAL is durable across application crashes in WAL mode; only a power loss
        # can drop the last transactions, and never corrupts the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

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

    def _migrate(self) -> None:
        tables = {
            r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if tables and "meta" not in tables:
            raise StoreError(
                f"{self.path}: an SQLite file, but not a covshift store "
                f"(tables: {', '.join(sorted(tables))})"
            )
        if "meta" in tables:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this covshift "
                    f"({__version__}, schema {SCHEMA_VERSION}); upgrade covshift to read it"
                )
            if version == SCHEMA_VERSION:
                return
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('created_by', ?)", (f"covshift {__version__}",)
            )

    # -- writing -------------------------------------------------------------
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
    ) -> int:
        """Record a new run with status ``running``; returns its id."""
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO runs (name, preset, experiment, config, seed, status, started_at,"
                " python_version, torch_version, covshift_version, device, host, pid)"
                " VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    preset,
                    experiment,
                    json.dumps(dict(config), sort_keys=True),
                    seed,
                    _now(),
                    platform.python_version(),
                    torch_version,
                    __version__,
                    device,
                    socket.gethostname(),
                    os.getpid(),
                ),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def log_scalars(self, run_id: int, step: int, values: Mapping[str, float]) -> None:
        """Record scalar series values at ``step`` (one transaction)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO scalars (run_id, name, step, value) VALUES (?, ?, ?, ?)",
                [(run_id, name, step, float(v)) for name, v in values.items()],
            )
            db.execute("UPDATE runs SET last_step = MAX(last_step, ?) WHERE id = ?", (step, run_id))

    def log_probe(
        self, run_id: int, step: int, layer: str, stats: Mapping[str, np.ndarray]
    ) -> None:
        """Record one probe record: named arrays (per-unit statistics) of ``layer``."""
        rows = []
        for stat, array in stats.items():
            a = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            rows.append(
                (run_id, layer, stat, step, a.dtype.str, json.dumps(list(a.shape)), a.tobytes())
            )
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO probe_records (run_id, layer, stat, step, dtype, shape,"
                " data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def reopen_run(self, run_id: int) -> None:
        """Mark an interrupted or failed run as ``running`` again (it is being resumed)."""
        run = self.run(run_id)
        if run.status == "finished":
            raise StoreError(f"run {run_id} is finished; there is nothing to resume")
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status = 'running', ended_at = NULL, error = NULL,"
                " host = ?, pid = ? WHERE id = ?",
                (socket.gethostname(), os.getpid(), run_id),
            )

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """Close a run as ``finished``, ``interrupted`` or ``failed``."""
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES[1:])}, got {status!r}")
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status = ?, ended_at = ?, error = ? WHERE id = ?",
                (status, _now(), error, run_id),
            )

    # -- reading -------------------------------------------------------------
    def _row_to_run(self, row: tuple[Any, ...]) -> RunInfo:
        (
            id_,
            name,
            preset,
            experiment,
            config,
            seed,
            status,
            started,
            ended,
            last_step,
            py,
            tv,
            cv,
            device,
            host,
            pid,
            error,
        ) = row
        return RunInfo(
            id_,
            name,
            preset,
            experiment,
            json.loads(config),
            seed,
            status,
            started,
            ended,
            last_step,
            py,
            tv,
            cv,
            device,
            host,
            pid,
            error,
        )

    _RUN_COLUMNS = (
        "id, name, preset, experiment, config, seed, status, started_at, ended_at,"
        " last_step, python_version, torch_version, covshift_version, device, host,"
        " pid, error"
    )

    def runs(self, experiment: str | None = None) -> list[RunInfo]:
        """All runs, newest first (optionally of one experiment).

        A run still marked ``running`` whose process is gone on this host is reported
        with status ``stale`` (it was killed without a chance to close itself).
        """
        query = f"SELECT {self._RUN_COLUMNS} FROM runs"
        args: tuple[Any, ...] = ()
        if experiment is not None:
            query += " WHERE experiment = ?"
            args = (experiment,)
        rows = self._db.execute(query + " ORDER BY id DESC", args).fetchall()
        runs = [self._row_to_run(r) for r in rows]
        here = socket.gethostname()
        return [
            RunInfo(**{**r.__dict__, "status": "stale"})
            if r.status == "running"
            and r.host == here
            and r.pid
            and r.pid != os.getpid()
            and not _pid_alive(r.pid)
            else r
            for r in runs
        ]

    def run(self, run_id: int) -> RunInfo:
        row = self._db.execute(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no run with id {run_id}")
        return self._row_to_run(row)

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
