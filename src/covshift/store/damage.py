"""Is a store file whole? Checked when it is opened, before anything is written to it.

Two checks, both cheap (no page of data is read):

- :func:`check_header`, before SQLite opens the file: SQLite's 100-byte header is
  there, and the file is as long as the header says (a whole number of pages, and
  no fewer than the database's size in pages, when the header records it). A copy
  cut short or a file truncated by a full disk fails it; SQLite itself would open
  such a file and fail later, midway through a sweep, on the first missing page.
- :func:`check_promise`, once it is open: every table, column, key and index that
  the store's schema version promises (:mod:`covshift.store.versions`) is there.
  A store that lost one is refused, with what is missing; it is not migrated nor
  repaired (a migration's ``CREATE ... IF NOT EXISTS`` would quietly make an empty
  table where the recorded one was).

Either raises :class:`~covshift.store.errors.StoreDamagedError`, which names the file,
says what is missing, and what to do.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from covshift.store.errors import StoreError, damaged
from covshift.store.guard import GuardedConnection
from covshift.store.held_files import read_head
from covshift.store.versions import Index, promise

__all__ = ["check_header", "check_promise"]

SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER = 100


def check_header(path: Path) -> None:
    """Refuse a non-empty file that is not SQLite's, or one cut short (see the module).

    Skipped when this process already holds a connection to the file: reading it
    would release that connection's locks (:mod:`covshift.store.held_files`)."""
    size = path.stat().st_size
    if size == 0:
        return  # no store yet: what an interrupted first run leaves (see opening)
    head = read_head(path, _HEADER)
    if head is None:
        return  # open in this process already: checked then, and not to be read now
    if not head.startswith(SQLITE_MAGIC[: len(head)]) or (
        len(head) >= len(SQLITE_MAGIC) and not head.startswith(SQLITE_MAGIC)
    ):
        raise StoreError(
            f"{path}: not a usable SQLite database (it does not begin with SQLite's "
            "header: another kind of file); give the path of a covshift store, or of a "
            "new file"
        )
    if size < _HEADER:
        raise damaged(path, f"it is {size} bytes long, shorter than SQLite's 100-byte header")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise damaged(path, f"its header gives an impossible page size ({page_size})")
    if size % page_size:
        raise damaged(
            path,
            f"it is {size} bytes long, not a whole number of its {page_size}-byte pages "
            "(truncated: a copy cut short, or a write that ran out of space)",
        )
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return  # pages may live in the write-ahead log until it is checkpointed
    # The size in pages (offset 28) is valid when the version-valid-for number
    # (offset 92) equals the change counter (offset 24).
    pages = int.from_bytes(head[28:32], "big")
    if pages and head[92:96] == head[24:28] and pages * page_size > size:
        raise damaged(
            path,
            f"it is {size} bytes long, but its header says {pages} pages of {page_size} "
            f"bytes ({pages * page_size} bytes): truncated (a copy cut short, or a write "
            "that ran out of space)",
        )


def check_promise(db: GuardedConnection | sqlite3.Connection, path: Path, version: int) -> None:
    """Refuse a store that lacks a table, column, key or index its schema ``version``
    promises (see the module); reads only ``sqlite_master`` and table pragmas."""
    expected = promise(version)
    missing: list[str] = []
    for name, table in expected.tables.items():
        info = db.execute(f"PRAGMA table_info({name})").fetchall()
        if not info:
            missing.append(f"table {name}")
            continue
        have = {row[1] for row in info}
        missing += [f"column {name}.{c}" for c in table.columns if c not in have]
        keys = _unique_column_sets(db, name, info)
        missing += [
            f"the unique key of {name} ({', '.join(key)})"
            for key in table.keys
            if set(key) <= have and frozenset(key) not in keys
        ]
    present = _present(db)  # an index of a missing table is not listed again
    missing_indexes = {
        name: index
        for name, index in expected.indexes.items()
        if index.table in present and not _has_index(db, name, index)
    }
    for n, i in missing_indexes.items():
        missing.append(f"index {n} on {i.table} ({', '.join(i.columns)})")
    if not missing:
        return
    what = f"schema version {expected.version} has {_listed(missing)}, which this file lacks"
    if len(missing_indexes) == len(missing):  # an index alone is rebuilt from the rows
        statements = "; ".join(
            f"CREATE INDEX {n} ON {i.table} ({', '.join(i.columns)})"
            for n, i in missing_indexes.items()
        )
        advice = (
            "covshift leaves the file as it is. The rows are all there: recreate the index "
            f"with: sqlite3 {path} '{statements}' (or restore the file from a backup)"
        )
        raise damaged(path, what, advice)
    raise damaged(path, what)


def _present(db: GuardedConnection | sqlite3.Connection) -> set[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows}


def _unique_column_sets(
    db: GuardedConnection | sqlite3.Connection, table: str, info: list[tuple]
) -> set[frozenset[str]]:
    """The column sets of ``table`` that are unique: its INTEGER PRIMARY KEY (the rowid),
    and every unique index (primary key and UNIQUE constraints included)."""
    key = [row for row in info if row[5] > 0]  # the primary key's columns
    rowid = len(key) == 1 and str(key[0][2]).upper() == "INTEGER"
    found = {frozenset([key[0][1]])} if rowid else set()
    for row in db.execute(f"PRAGMA index_list({table})").fetchall():
        if row[2]:  # unique
            columns = db.execute(f"PRAGMA index_info({row[1]})").fetchall()
            found.add(frozenset(c[2] for c in columns))
    return found


def _has_index(db: GuardedConnection | sqlite3.Connection, name: str, index: Index) -> bool:
    columns = db.execute(f"PRAGMA index_info({name})").fetchall()
    return tuple(c[2] for c in columns) == index.columns


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
