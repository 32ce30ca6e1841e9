"""Opening a store file: half-created files, other databases, files that cannot be written."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from covshift.store import NoStoreError, Store, StoreError
from covshift.store import schema as store_schema
from covshift.store.errors import is_read_only


def _half_created(path: Path, *, wal: bool = True) -> None:
    """What a Ctrl-C during the store's creation leaves: a valid SQLite file (its header
    page written by setting the page size and journal mode), no table in it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA page_size=4096")
    db.execute(f"PRAGMA journal_mode={'WAL' if wal else 'DELETE'}")
    db.execute("VACUUM")  # writes the header even in rollback mode
    db.close()
    assert path.stat().st_size == 4096
    assert path.read_bytes()[:16] == b"SQLite format 3\x00"


def _tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()


@pytest.mark.parametrize("kind", ["empty", "header, WAL", "header, rollback journal"])
def test_a_half_created_file_becomes_a_store_on_a_writing_open(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "covshift.db"
    if kind == "empty":
        path.touch()
    else:
        _half_created(path, wal=kind == "header, WAL")
    with Store(path) as store:
        assert store.runs() == []
        run = store.start_run("a", config={})
        store_id = store.store_id
    with Store(path, create=False) as store:
        assert [r.id for r in store.runs()] == [run] and store.store_id == store_id
    db = sqlite3.connect(path)
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    db.close()
    assert set(meta) == {"schema_version", "created_by", "store_id"}


@pytest.mark.parametrize("kind", ["empty", "header"])
def test_a_reading_open_of_a_half_created_file_writes_nothing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "covshift.db"
    if kind == "empty":
        path.touch()
    else:
        _half_created(path)
    before = path.read_bytes()
    with pytest.raises(NoStoreError, match="not a covshift store") as caught:
        Store(path, create=False)
    assert str(path) in str(caught.value) and "the next run initialises it" in str(caught.value)
    assert isinstance(caught.value, StoreError)  # what the CLI reports as a message
    assert path.read_bytes() == before and _tables(path) == set()


def test_an_interrupted_creation_leaves_no_partial_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "covshift.db"
    create = store_schema._create

    def create_then_interrupt(db: sqlite3.Connection) -> None:
        create(db)
        raise KeyboardInterrupt  # Ctrl-C once the tables exist, before the commit

    monkeypatch.setattr(store_schema, "_create", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        Store(path)
    assert path.is_file() and _tables(path) == set()  # the transaction was rolled back
    monkeypatch.undo()
    with Store(path) as store:  # the next run makes it a store
        assert store.runs() == [] and len(store.store_id) == 32


def test_another_programs_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER)")
    db.commit()
    db.close()
    before = path.read_bytes()
    for create in (True, False):
        with pytest.raises(StoreError, match="not a covshift store") as caught:
            Store(path, create=create)
        assert str(path) in str(caught.value) and "tables: users" in str(caught.value)
    assert path.read_bytes() == before  # not even switched to WAL
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()


# -- files that cannot be written ---------------------------------------------------


def test_read_only_errors_are_told_from_broken_databases() -> None:
    assert is_read_only(sqlite3.OperationalError("attempt to write a readonly database"))
    assert is_read_only(PermissionError(1, "Operation not permitted"))
    assert is_read_only(OSError(30, "Read-only file system"))
    assert not is_read_only(sqlite3.DatabaseError("file is not a database"))
    assert not is_read_only(FileNotFoundError(2, "No such file or directory"))


def _connect_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every SQLite connection opens its file read-only (URI ``mode=ro``), as
    SQLite does by itself with a file it may not write (permissions, chattr +i, a
    read-only mount), which a test running as root cannot otherwise arrange."""
    connect = sqlite3.connect

    def read_only(path: object, *args: object, **kw: object) -> sqlite3.Connection:
        return connect(f"file:{path}?mode=ro", *args, uri=True, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite3, "connect", read_only)


def test_a_read_only_store_reads_and_refuses_writes_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "covshift.db"
    with Store(path) as store:
        store.start_run("a", config={})
    _connect_read_only(monkeypatch)
    for create in (False, True):
        with Store(path, create=create) as store:
            assert [r.name for r in store.runs()] == ["a"]
            with pytest.raises(StoreError, match="the store file is read-only") as caught:
                store.start_run("b", config={})
            assert str(caught.value).startswith(f"{path}: ")
            assert "not a usable" not in str(caught.value)


def test_a_read_only_half_created_file_says_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "covshift.db"
    _half_created(path)
    _connect_read_only(monkeypatch)
    with pytest.raises(StoreError, match="the store file is read-only") as caught:
        Store(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "not a usable" not in str(caught.value)


def test_a_write_that_fails_as_read_only_names_the_file(tmp_path: Path) -> None:
    # SQLite's own error, as a write to a file made read-only under an open store raises.
    class ReadOnly:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql.startswith(("INSERT", "UPDATE")):
                raise sqlite3.OperationalError("attempt to write a readonly database")
            return self.db.execute(sql, *args)

        @property
        def in_transaction(self) -> bool:
            return self.db.in_transaction

    path = tmp_path / "covshift.db"
    store = Store(path)
    real = store._db
    store._db = ReadOnly(real)  # type: ignore[assignment]
    try:
        with pytest.raises(StoreError, match="the store file is read-only") as caught:
            store.start_run("a", config={})
        assert str(path) in str(caught.value)
    finally:
        real.close()


@contextmanager
def _immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i`` on ``paths`` (skips the test where that is not allowed)."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    done = []
    try:
        for path in paths:
            proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"chattr +i is not allowed here: {proc.stderr.strip()}")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_immutable_store_file_reads_and_says_read_only(tmp_path: Path) -> None:
    path = tmp_path / "covshift.db"
    with Store(path) as store:
        store.start_run("a", config={})
    with _immutable(path), Store(path) as store:
        assert [r.name for r in store.runs()] == ["a"]
        with pytest.raises(StoreError, match=f"{path}: the store file is read-only"):
            store.start_run("b", config={})


def test_an_immutable_folder_says_so_for_a_new_or_closed_store(tmp_path: Path) -> None:
    folder = tmp_path / "kept"
    folder.mkdir()
    with Store(folder / "old.db") as store:
        store.start_run("a", config={})
    assert sorted(p.name for p in folder.iterdir()) == ["old.db"]  # WAL files gone
    with _immutable(folder):
        for path in (folder / "new.db", folder / "sub" / "new.db", folder / "old.db"):
            with pytest.raises(StoreError, match=f"folder {folder} is read-only") as caught:
                Store(path)
            assert str(caught.value).startswith(f"{path}: ")


def test_storage_errors_are_said_by_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import pickle
    import shutil

    from covshift.store import StorageFault, StoreDamagedError
    from covshift.store.errors import storage_error

    path = tmp_path / "covshift.db"
    said = {
        "full": storage_error(path, sqlite3.OperationalError("database or disk is full")),
        "io": storage_error(path, sqlite3.OperationalError("disk I/O error")),
        "bad": storage_error(path, sqlite3.DatabaseError("database disk image is malformed")),
        "enospc": storage_error(path, OSError(errno.ENOSPC, "No space left on device")),
        "erofs": storage_error(path, OSError(errno.EROFS, "Read-only file system")),
    }
    assert isinstance(said["full"], StorageFault) and "the disk is full" in str(said["full"])
    assert "an I/O error on the file" in str(said["io"])
    assert isinstance(said["bad"], StoreDamagedError) and "SQLite cannot read it" in str(
        said["bad"]
    )
    assert "no space is left on the device" in str(said["enospc"])
    assert "read-only" in str(said["erofs"])
    assert all(str(s).startswith(f"{path}: ") for s in said.values())
    assert storage_error(path, sqlite3.OperationalError("no such function: foo")) is None  # a bug
    # SQLite says "disk I/O error" when its -shm file cannot grow on a full disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    io = storage_error(path, sqlite3.OperationalError("disk I/O error"))
    assert "cannot use it: the disk is full (SQLite: disk I/O error)" in str(io)
    # A fault raised in a pool worker reaches the driver whole.
    fault = said["full"].noted("Run 3 (x) was closed as interrupted.")  # type: ignore[union-attr]
    back = pickle.loads(pickle.dumps(fault))
    assert str(back) == str(fault) and back.notes == fault.notes


def test_a_second_open_in_one_process_keeps_the_first_connections_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it.
    Opening a store a second time in a process that already has it open must not read
    the file itself (its header check), or the first connection loses its locks: a
    process that then closes its own connection believes it is the last, checkpoints
    and deletes the write-ahead log, and the first connection's later commits are
    lost (runs of a sweep vanished after Ctrl-C while another process polled)."""
    import sys

    db = tmp_path / "c.db"
    first = Store(db)
    run = first.start_run("a", config={"x": 1}, seed=0)
    first.log_scalars(run, 1, {"loss": 1.0})
    Store(db).close()  # a second open and close in this process
    other = f"from covshift.store import Store; Store({str(db)!r}).close()"
    subprocess.run([sys.executable, "-c", other], check=True, timeout=120)
    for step in range(2, 6):
        first.log_scalars(run, step, {"loss": float(step)})
    # Another process reads what the first connection committed, while it is open.
    reader = (
        f"from covshift.store import Store\n"
        f"with Store({str(db)!r}) as s:\n"
        f"    (r,) = s.runs(); print(s.scalars(r.id, 'loss')[0].tolist())"
    )
    seen = subprocess.run(
        [sys.executable, "-c", reader], capture_output=True, text=True, timeout=120
    )
    first.close()
    assert seen.returncode == 0 and seen.stdout.split() == ["[1,", "2,", "3,", "4,", "5]"], (
        seen.stdout + seen.stderr
    )
    with Store(db) as store:
        (recorded,) = store.runs()
        steps, values = store.scalars(recorded.id, "loss")
    assert list(steps) == [1, 2, 3, 4, 5] and list(values) == [1.0, 2.0, 3.0, 4.0, 5.0]
