"""Which store files this process holds open through SQLite, so that covshift never
reads their bytes itself while it does.

POSIX advisory locks belong to a process and a file, not to a descriptor: closing
*any* descriptor of a file releases every lock the process holds on it ("How To
Corrupt An SQLite Database File", §2.2, sqlite.org). A process with an SQLite
connection to a store that opens the file with ``open()`` (to read SQLite's header,
say) and closes it has silently dropped its connection's locks. Another process
that then closes its own connection takes the database's exclusive lock, believes
it is the last connection, checkpoints and deletes the write-ahead log, and the
first process's later commits go to a log nobody reads: runs, scalars and probe
records vanish. So the header is read only by a process that holds no connection to
the file (the first open in each process checks it; later opens skip the check).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

__all__ = ["held", "hold", "read_head", "release"]

_lock = threading.Lock()
_held: Counter[tuple[int, int]] = Counter()


def _key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)  # one file, however its path is spelled


def held(path: Path) -> bool:
    """Whether this process holds an SQLite connection to the file at ``path``."""
    key = _key(path)
    with _lock:
        return key is not None and _held[key] > 0


def hold(path: Path) -> tuple[int, int] | None:
    """Record a connection to ``path`` opened by this process; returns the token for
    :func:`release`."""
    key = _key(path)
    if key is not None:
        with _lock:
            _held[key] += 1
    return key


def release(key: tuple[int, int] | None) -> None:
    """Forget a connection recorded by :func:`hold`."""
    if key is None:
        return
    with _lock:
        _held[key] -= 1
        if _held[key] <= 0:
            del _held[key]


def read_head(path: Path, size: int) -> bytes | None:
    """The first ``size`` bytes of ``path``, or None when this process holds an SQLite
    connection to it (reading would release that connection's locks)."""
    if held(path):
        return None
    with path.open("rb") as f:
        return f.read(size)
