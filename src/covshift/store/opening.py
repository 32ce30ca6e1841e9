"""Opening a store file: checking what it is, then bringing it to the current schema.

A store is one SQLite file in WAL mode. What a path can hold, and what opening does:

- nothing, an empty file, or an SQLite file without any table: no store yet. A first
  run interrupted (Ctrl-C) while it created the store leaves such a file, since the
  schema is written in one transaction that is then rolled back. A writing open makes
  it a store; a reading open (``create=False``) writes nothing and raises
  :class:`~covshift.store.errors.NoStoreError`.
- a covshift store: opened, migrated when its schema is older (refused when newer).
- an SQLite file with other tables: another program's database, refused untouched
  (its journal mode is not changed either).
- a file that cannot be written (permissions, an immutable flag, a read-only file
  system): a reading open reads it; a write raises a
  :class:`~covshift.store.errors.StoreError` that says the file is read-only.
- a damaged store (truncated; a table, column, key or index its version promises
  missing; see :mod:`covshift.store.damage`): refused with
  :class:`~covshift.store.errors.StoreDamagedError`, before anything is written to it
  (not even its journal mode), whether the open would write or only read.
- a file that is not SQLite's: refused untouched.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

from covshift._version import __version__
from covshift.store.damage import check_header, check_promise
from covshift.store.errors import (
    NoStoreError,
    StoreError,
    damaged,
    is_read_only,
    not_writable,
    storage_error,
)
from covshift.store.guard import GuardedConnection
from covshift.store.schema import SCHEMA_VERSION, migrate, stored_version

__all__ = ["open_store"]

_SQLITE_CANTOPEN = 14
# Tables every covshift store has had since schema 1 (besides meta).
_RECORDS = {"runs", "scalars", "probe_records"}
# Said of a file that holds no store yet, on a reading open.
_LEFT_BY_INTERRUPTION = "an interrupted first run leaves one behind; the next run initialises it"


def open_store(path: Path, *, create: bool) -> tuple[GuardedConnection, str]:
    """Connect to the store at ``path`` (``create``: make it when there is none) and
    return the connection (autocommit: each write takes its own transaction; SQLite's
    errors about the file said as :class:`StoreError`) and the store's id."""
    if path.is_dir():
        raise StoreError(f"{path} is a folder; give the path of a .db file")
    if not create and not path.is_file():
        raise NoStoreError(f"no store at {path}")
    if not create and path.stat().st_size == 0:
        # Reading commands never write: an empty file is not made into a store.
        raise NoStoreError(
            f"{path} is an empty file, not a covshift store ({_LEFT_BY_INTERRUPTION})"
        )
    try:
        if path.is_file():
            check_header(path)  # before SQLite reads (or writes) a byte of it
        if create:
            _create_file(path)
        db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    except OSError as e:
        raise storage_error(path, e) or e from None
    except sqlite3.DatabaseError as e:
        raise _unusable(path, e) from None
    try:
        store_id = _open(db, path, create=create)
    except BaseException as e:
        db.close()
        if isinstance(e, sqlite3.DatabaseError):
            raise _unusable(path, e) from None
        raise
    return GuardedConnection(db, path), store_id


def _create_file(path: Path) -> None:
    """Create ``path`` (and its folder) when missing, so that a file that cannot be
    created says why (SQLite would only say "unable to open database file")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # O_CREAT without O_TRUNC: a file another process created meanwhile is kept.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))


def _unusable(path: Path, error: sqlite3.DatabaseError) -> StoreError:
    """The error for a database SQLite could not use: one that cannot be written, a
    full or failing disk, a damaged file, or (only then) one that is not usable."""
    if is_read_only(error):
        return not_writable(path, error)
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    cannot_open = code == _SQLITE_CANTOPEN or "unable to open database file" in str(error)
    if cannot_open and path.is_file() and not os.access(path.parent, os.W_OK):
        # A store in WAL mode is read through its -shm file, which SQLite creates beside
        # the store when missing: a read-only folder makes even reading fail.
        return not_writable(path, error, folder=True)
    return storage_error(path, error) or StoreError(
        f"{path}: not a usable SQLite database ({error})"
    )


def _open(db: sqlite3.Connection, path: Path, *, create: bool) -> str:
    """Check what the file holds (before anything is written to it), set the
    connection up, create or migrate the schema; returns the store's id."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables and not create:
        raise NoStoreError(
            f"{path} is an SQLite file without tables, not a covshift store yet "
            f"({_LEFT_BY_INTERRUPTION})"
        )
    if tables and "meta" not in tables:
        if _RECORDS <= tables:  # a covshift store's tables, without its meta table
            raise damaged(path, "its meta table (schema version, store id) is missing")
        raise StoreError(
            f"{path}: an SQLite file, but not a covshift store "
            f"(tables: {', '.join(sorted(tables))})"
        )
    version = stored_version(db)
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version} is newer than this covshift "
            f"({__version__}, schema {SCHEMA_VERSION}); upgrade covshift to read it"
        )
    if version == 0 and "point" in {r[1] for r in db.execute("PRAGMA table_info(runs)")}:
        # Only a version-1 store may lack its version row (it is then migrated); a
        # later one migrated "from 1" would lose the columns version 1 did not have.
        raise damaged(
            path, "its meta table has lost its schema_version row, so its version is unknown"
        )
    if version is not None:
        check_promise(db, path, version)  # reads only: a damaged file is left as it is
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across application crashes in WAL mode; only a power loss can
    # drop the last transactions, and never corrupts the file.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    if version != SCHEMA_VERSION:
        # A random identity, so files kept beside the store (checkpoints) can tell
        # their store from another one in the same folder or a recreated one; written
        # with the schema, so a store never exists without it.
        meta = {"created_by": f"covshift {__version__}", "store_id": uuid.uuid4().hex}
        migrate(db, meta)
    query = "SELECT value FROM meta WHERE key = 'store_id'"
    if db.execute(query).fetchone() is None:  # a store made before stores had an id
        db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
    return str(db.execute(query).fetchone()[0])
