"""Opening a store file: checking what it is, then bringing it to the current schema.

A store is one SQLite file in WAL mode. Opening it refuses what is not a covshift
store (a folder, an empty file on a reading open, another program's database, a schema
newer than this covshift), creates or migrates the schema, and reads the store's
identity (a random id kept in ``meta``).
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from covshift._version import __version__
from covshift.store.errors import StoreError
from covshift.store.schema import SCHEMA_VERSION, migrate, stored_version

__all__ = ["open_store"]


def open_store(path: Path, *, create: bool) -> tuple[sqlite3.Connection, str]:
    """Connect to the store at ``path`` (``create``: make it when missing) and return the
    connection (autocommit: each write takes its own transaction) and the store's id."""
    if path.is_dir():
        raise StoreError(f"{path} is a folder; give the path of a .db file")
    if not create and not path.is_file():
        raise StoreError(f"no store at {path}")
    if not create and path.stat().st_size == 0:
        # Reading commands never write: an empty file is not made into a store.
        raise StoreError(f"{path} is an empty file, not a covshift store")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across application crashes in WAL mode; only a power
        # loss can drop the last transactions, and never corrupts the file.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        store_id = _check_and_migrate(db, path)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not a usable SQLite database ({e})") from None
    return db, store_id


def _check_and_migrate(db: sqlite3.Connection, path: Path) -> str:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if tables and "meta" not in tables:
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
    if version != SCHEMA_VERSION:
        migrate(db)
        db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('created_by', ?)", (f"covshift {__version__}",)
        )
    # A random identity, so files kept beside the store (checkpoints) can tell
    # their store from another one in the same folder or a recreated one.
    query = "SELECT value FROM meta WHERE key = 'store_id'"
    if db.execute(query).fetchone() is None:
        db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
    return str(db.execute(query).fetchone()[0])
