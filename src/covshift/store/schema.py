"""The store's schema: its tables, its version, and the migrations between versions.

Version 1 (covshift 0.1, before sweeps): runs, scalars, probe_records.
Version 2 adds what sweeps need:

- ``runs.point``: the identity of the grid point a run trains (a hash of its resolved
  configuration and seed, :mod:`covshift.experiments.grid`); unique, so a point is
  recorded at most once whatever the number of processes claiming it;
- ``runs.status = 'diverged'`` with ``runs.diverged_at`` (the step at which the
  divergence rule fired), a measured outcome like ``finished``;
- ``runs.threads``: torch's intra-op threads the run trains with; a resumed run keeps
  them, since the thread count changes the last bits of a float reduction;
- ``experiments`` and ``experiment_points``: a sweep's configuration and its grid.

Migration 1 -> 2 rebuilds ``runs`` (SQLite cannot change a CHECK constraint in place)
inside one transaction with foreign keys off, so the scalars and probe records that
reference runs are neither dropped nor orphaned; legacy runs keep ``point = NULL``.

Version 3 says which axis of a layer's values held its units, per probe record
(:mod:`covshift.probe.units`): ``probe_records.unit_dim`` (the axis, 0 being the batch
axis), ``unit_source`` (``given``, ``layer``, ``producer``, ``only``, ``assumed``) and
``unit_rule`` (why, in words), the same on every statistic row of one record.
Migration 2 -> 3 adds the three columns; rows recorded before have NULL there (the
probe then used one axis for every layer: 1 unless its ``unit_dim`` said otherwise),
as have records that are not per unit (gradient ICS, smoothness).

Version 4 adds ``events``: what happened to a run that its row does not say, one row
each (``run_id``, ``at``, ``kind``, ``path``, ``message``); the kinds are
``checkpoint_damaged`` (a checkpoint failed its digest check or could not be read:
set aside at ``path``, the run restarted) and ``checkpoint_unverified`` (a checkpoint
without a digest, as covshift wrote them before schema 4: set aside, the run
restarted).
Migration 3 -> 4 creates the table and its index.

What each version holds is written out in :mod:`covshift.store.versions`; a store
that lacks any of it is refused when opened (:mod:`covshift.store.damage`), before a
migration could write to it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Mapping
from dataclasses import fields

from covshift.store.rows import RunInfo

__all__ = ["SCHEMA_VERSION", "migrate", "stored_version"]

SCHEMA_VERSION = 4


def _runs_table(name: str) -> str:
    """The ``CREATE TABLE`` of the current ``runs`` under ``name``: one column per
    field of :class:`~covshift.store.rows.RunInfo`, in its order and declaration."""
    columns = ",\n".join(f"    {f.name} {f.metadata['sql']}" for f in fields(RunInfo))
    return f"CREATE TABLE {name} (\n{columns}\n)"


_OTHER_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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
    unit_dim INTEGER,
    unit_source TEXT,
    unit_rule TEXT,
    PRIMARY KEY (run_id, layer, stat, step)
);
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS experiment_points (
    experiment TEXT NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    point TEXT NOT NULL,
    position INTEGER NOT NULL,
    network TEXT NOT NULL,
    seed INTEGER NOT NULL,
    axes TEXT NOT NULL,
    PRIMARY KEY (experiment, point)
);
"""

# Version 4's table: kept apart from _OTHER_TABLES, which the 1 -> 2 migration replays.
_EVENTS = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER REFERENCES runs (id) ON DELETE CASCADE,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id);
"""

# Version-1 columns of runs, in their order (the migration copies these). Written out,
# not derived from RunInfo: they are what old files hold, whatever RunInfo becomes.
_V1_RUN_COLUMNS = (
    "id, name, preset, experiment, config, seed, status, started_at, ended_at, last_step,"
    " python_version, torch_version, covshift_version, device, host, pid, error"
)


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


def _create(db: sqlite3.Connection) -> None:
    db.execute(_runs_table("runs"))
    for statement in _statements(_OTHER_TABLES + _EVENTS):
        db.execute(statement)


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    db.execute(_runs_table("runs_v2"))
    db.execute(f"INSERT INTO runs_v2 ({_V1_RUN_COLUMNS}) SELECT {_V1_RUN_COLUMNS} FROM runs")
    db.execute("DROP TABLE runs")
    db.execute("ALTER TABLE runs_v2 RENAME TO runs")
    for statement in _statements(_OTHER_TABLES):
        db.execute(statement)
    problems = db.execute("PRAGMA foreign_key_check").fetchall()
    if problems:  # pragma: no cover - the copy keeps every id, so nothing can dangle
        raise sqlite3.IntegrityError(f"migration left dangling references: {problems[:5]}")


# Columns added to probe_records by version 3, with their types.
_UNIT_COLUMNS = (("unit_dim", "INTEGER"), ("unit_source", "TEXT"), ("unit_rule", "TEXT"))


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    # ADD COLUMN keeps every row (NULL in the new columns); a table that already has a
    # column (created by this version's CREATE TABLE in an earlier migration) keeps it.
    have = {row[1] for row in db.execute("PRAGMA table_info(probe_records)")}
    for column, kind in _UNIT_COLUMNS:
        if column not in have:
            db.execute(f"ALTER TABLE probe_records ADD COLUMN {column} {kind}")


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    for statement in _statements(_EVENTS):
        db.execute(statement)


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}


def migrate(db: sqlite3.Connection, meta: Mapping[str, str] | None = None) -> None:
    """Bring the database to :data:`SCHEMA_VERSION` (creating it when empty), and record
    the ``meta`` rows it lacks (kept where present: the first of two processes wins).

    Runs in one ``BEGIN IMMEDIATE`` transaction with foreign keys off (a table rebuild
    would otherwise cascade-delete the rows that reference it), so a crash or Ctrl-C
    midway leaves the old version intact, and a new store is all there (tables,
    version, ``meta``) or not at all; the version is read inside the transaction, so
    two processes opening one old store migrate it once. ``db`` must be in autocommit
    mode (isolation_level None).
    """
    db.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set it first
    db.execute("BEGIN IMMEDIATE")
    try:
        current = _read_version(db)
        if current is None:
            _create(db)
        else:
            # 0: a meta table without a version row (a version-1 store that lost it).
            current = max(current, 1)
            while current < SCHEMA_VERSION:
                _MIGRATIONS[current](db)
                current += 1
        db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", (meta or {}).items())
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA foreign_keys=ON")
        raise
    db.execute("PRAGMA foreign_keys=ON")


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does by itself on
    a full disk or an I/O error): the error that caused it is the one to raise."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def stored_version(db: sqlite3.Connection) -> int | None:
    """The schema version of a database (None: not yet a covshift store)."""
    return _read_version(db)


def _has_tables(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone() is not None


def _read_version(db: sqlite3.Connection) -> int | None:
    if not _has_tables(db):
        return None
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0
