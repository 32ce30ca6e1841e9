"""The errors the store raises for anything a user can fix, and how a low-level error
(SQLite's or the operating system's) that means "this file cannot be written" is told
apart from one that means "this is not a usable database"."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

__all__ = ["NoStoreError", "StoreError", "is_read_only", "not_writable"]


class StoreError(Exception):
    """The database cannot be used (newer schema, not a covshift store, unknown run,
    a file that cannot be written)."""


class NoStoreError(StoreError):
    """There is no covshift store at the path yet: no file, an empty file, or an SQLite
    file without tables (what a first run interrupted while creating the store leaves).
    Raised only by a reading open (``Store(path, create=False)``); a writing one makes
    such a file a store."""


# Permission denied, operation not permitted (an immutable file: chattr +i), read-only
# file system: each means the file cannot be written, whatever the process tries.
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_SQLITE_READONLY = 8  # the primary result code; extended codes keep it in the low byte


def is_read_only(error: BaseException) -> bool:
    """Whether ``error`` says that a file could not be written (not that it is broken)."""
    if isinstance(error, OSError):
        return error.errno in _READ_ONLY_ERRNOS
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)  # set by sqlite3 on Python >= 3.11
        if code is not None and code & 0xFF == _SQLITE_READONLY:
            return True
        return "readonly database" in str(error)  # "attempt to write a readonly database"
    return False


def not_writable(path: Path, error: BaseException, *, folder: bool = False) -> StoreError:
    """The error to raise when the store file ``path`` cannot be written (``folder``:
    the file could, but its folder cannot, where SQLite keeps the WAL beside it)."""
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename and Path(error.filename) != path else ""
        detail = f"{error.strerror or error}{where}"
    else:
        detail = str(error)
    if folder or not path.exists():
        parent = path.parent
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent  # the folder that refused to hold a new folder
        action = "create the file" if not path.exists() else "keep the WAL files beside it"
        what = f"the store file's folder {parent} is read-only, so covshift cannot {action}"
    else:
        what = "the store file is read-only, covshift cannot write to it"
    return StoreError(
        f"{path}: {what} ({detail}); check the permissions of the file and its folder, "
        "whether either is immutable (lsattr; chattr -i) or their file system mounted "
        "read-only, or use a store elsewhere"
    )
