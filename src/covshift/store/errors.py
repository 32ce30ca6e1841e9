"""The errors the store raises for anything a user can fix, and how a low-level error
(SQLite's or the operating system's) is told apart: "this file cannot be written"
(read-only), "the disk is full or failing" (:class:`StorageFault`), "this file is
damaged" (:class:`StoreDamagedError`), or none of these (a bug: left to propagate).

Each of them names the file and says what to do; the command line prints it as one
line and exits with status 2, without a traceback."""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

__all__ = [
    "NoStoreError",
    "StorageFault",
    "StoreDamagedError",
    "StoreError",
    "damaged",
    "file_fault",
    "is_read_only",
    "not_writable",
    "storage_error",
]


class StoreError(Exception):
    """The database cannot be used (newer schema, not a covshift store, unknown run,
    a file that cannot be written)."""


class NoStoreError(StoreError):
    """There is no covshift store at the path yet: no file, an empty file, or an SQLite
    file without tables (what a first run interrupted while creating the store leaves).
    Raised only by a reading open (``Store(path, create=False)``); a writing one makes
    such a file a store."""


class StoreDamagedError(StoreError):
    """The store file is damaged (truncated, a table, column or index missing, pages
    SQLite cannot read); covshift leaves it as it is."""


_DAMAGED_ADVICE = (
    "covshift leaves the file as it is. Restore it from a backup, or start a new store "
    "with --db NEW.db (its points then run again)"
)


def damaged(path: Path, what: str, advice: str = _DAMAGED_ADVICE) -> StoreDamagedError:
    """The error for a damaged store: the file, what is wrong with it, what to do."""
    return StoreDamagedError(f"{path}: the store is damaged: {what}. {advice}")


_SPACE_ADVICE = (
    "What was recorded before is kept; free some space (or fix the disk, or use a store "
    "elsewhere with --db) and run the same command again: it resumes"
)
_PERMISSION_ADVICE = (
    "Check the permissions of the file and its folder, whether either is immutable "
    "(lsattr; chattr -i) or their file system mounted read-only, or use a store elsewhere "
    "with --db; what was recorded before is kept"
)


class StorageFault(StoreError):
    """A file covshift keeps (the store, a checkpoint) could not be written or read
    for a reason outside covshift: the disk is full, an I/O error, a file or file
    system that is read-only. ``notes`` say what became of the runs in training
    (added by the sweep that stopped on it); ``advice`` what to do."""

    def __init__(
        self,
        path: Path | str,
        cause: str,
        notes: tuple[str, ...] = (),
        advice: str = _SPACE_ADVICE,
    ) -> None:
        self.path = Path(path)
        self.cause = cause
        self.notes = tuple(notes)
        self.advice = advice
        super().__init__(
            "".join([f"{self.path}: {cause}.", *(f" {n}" for n in notes), f" {advice}."])
        )

    def noted(self, *notes: str) -> StorageFault:
        """The same fault, saying more (what became of a run)."""
        return StorageFault(self.path, self.cause, self.notes + notes, self.advice)

    def __reduce__(self) -> tuple[type[StorageFault], tuple[Path, str, tuple[str, ...], str]]:
        # Raised in a pool worker, it travels to the driver pickled.
        return (StorageFault, (self.path, self.cause, self.notes, self.advice))


# Permission denied, operation not permitted (an immutable file: chattr +i), read-only
# file system: each means the file cannot be written, whatever the process tries.
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# SQLite's primary result codes (extended codes keep them in the low byte).
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26
# The errno of a file system that cannot take a write, and how to say it.
_OS_CAUSES = {
    errno.ENOSPC: "no space is left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EIO: "an I/O error (the disk or its file system is failing)",
    errno.EROFS: "the file system is read-only (remounted read-only after an error?)",
    errno.EFBIG: "the file is larger than the file system allows",
}


def is_read_only(error: BaseException) -> bool:
    """Whether ``error`` says that a file could not be written (not that it is broken)."""
    if isinstance(error, OSError):
        return error.errno in _READ_ONLY_ERRNOS
    if isinstance(error, sqlite3.Error):
        if _sqlite_code(error) == _SQLITE_READONLY:
            return True
        return "readonly database" in str(error)  # "attempt to write a readonly database"
    return False


def not_writable(path: Path, error: BaseException, *, folder: bool = False) -> StorageFault:
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
    return StorageFault(path, f"{what} ({detail})", advice=_PERMISSION_ADVICE)


def _sqlite_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)  # set by sqlite3 on Python >= 3.11
    return None if code is None else code & 0xFF


def file_fault(path: Path, error: OSError, doing: str = "write") -> StorageFault:
    """The fault of an operating system's ``error`` on a file covshift keeps beside
    the store (a checkpoint): what it means in words, and what to do."""
    cause = _OS_CAUSES.get(error.errno or 0, error.strerror or str(error))
    where = f" ({error.filename})" if error.filename and Path(error.filename) != path else ""
    advice = _PERMISSION_ADVICE if error.errno in (errno.EACCES, errno.EPERM) else _SPACE_ADVICE
    return StorageFault(path, f"cannot {doing} it: {cause}{where}", advice=advice)


def _nearly_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (next to) no space left."""
    try:
        return shutil.disk_usage(path.parent).free < 64 * 1024
    except OSError:
        return False


def storage_error(path: Path, error: BaseException) -> StoreError | None:
    """The :class:`StoreError` that SQLite's (or the system's) ``error`` on the store
    ``path`` means, or None when it means none (a bug, left to propagate):

    - a read-only file: :func:`not_writable`;
    - "database or disk is full", "disk I/O error", or an OSError such as ENOSPC:
      :class:`StorageFault`;
    - "database disk image is malformed", "file is not a database": the store is
      damaged (:class:`StoreDamagedError`).
    """
    if isinstance(error, StoreError):
        return error
    if is_read_only(error):
        return not_writable(path, error)
    if isinstance(error, OSError):
        return file_fault(path, error)
    if not isinstance(error, sqlite3.Error):
        return None
    code, text = _sqlite_code(error), str(error)
    if code == _SQLITE_FULL or "database or disk is full" in text:
        return StorageFault(path, f"cannot write it: the disk is full (SQLite: {text})")
    if code == _SQLITE_IOERR or "disk I/O error" in text:
        if _nearly_full(path):  # SQLite says I/O error when the -shm file cannot grow
            return StorageFault(path, f"cannot use it: the disk is full (SQLite: {text})")
        return StorageFault(path, f"an I/O error on the file (SQLite: {text})")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text or "not a database" in text:
        return damaged(path, f"SQLite cannot read it ({text})")
    return None
