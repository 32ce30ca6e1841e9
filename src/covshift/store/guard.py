"""The store's connection, with SQLite's errors about the file said as such.

Every statement the store runs goes through :class:`GuardedConnection`: an error
that means the file cannot be used (the disk is full, an I/O error, a read-only
file, pages SQLite cannot read) becomes the :class:`~covshift.store.errors.StoreError`
that names the file and says what to do (:func:`~covshift.store.errors.storage_error`),
whether it is raised when the statement runs or when its rows are fetched. Any other
error is covshift's own bug and propagates as it is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from covshift.store.errors import storage_error
from covshift.store.held_files import hold, release

__all__ = ["GuardedConnection", "GuardedCursor"]

T = TypeVar("T")


def _guarded(path: Path, call: Callable[[], T]) -> T:
    try:
        return call()
    except sqlite3.Error as e:
        said = storage_error(path, e)
        if said is None:
            raise
        raise said from None


class GuardedCursor:
    """A cursor whose fetches say file errors as :class:`StoreError` (see the module)."""

    def __init__(self, cursor: sqlite3.Cursor, path: Path) -> None:
        self._cursor = cursor
        self._path = path

    def fetchone(self) -> Any:
        return _guarded(self._path, self._cursor.fetchone)

    def fetchall(self) -> list[Any]:
        return _guarded(self._path, self._cursor.fetchall)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount


class GuardedConnection:
    """An autocommit connection to the store at ``path`` (see the module docstring)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.raw = db
        self.path = path
        self._held = hold(path)  # see covshift.store.held_files

    def execute(self, sql: str, params: Sequence[Any] = ()) -> GuardedCursor:
        return GuardedCursor(_guarded(self.path, lambda: self.raw.execute(sql, params)), self.path)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> GuardedCursor:
        cursor = _guarded(self.path, lambda: self.raw.executemany(sql, rows))
        return GuardedCursor(cursor, self.path)

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def close(self) -> None:
        self.raw.close()
        release(self._held)
        self._held = None
