"""A disk that fills up (or fails) at any moment of a sweep: one message that names the
file and the cause, the run in training closed ``interrupted`` where the store can
still be written (else left ``running`` for ``covshift clean``, and the message says
so), nothing half-written, and the next call resumes to the numbers of an
uninterrupted run."""

from __future__ import annotations

import errno
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

import covshift.checkpoint_files as checkpoint_files
from covshift.experiments import load_config, run_experiment
from covshift.experiments.backends import InlineBackend
from covshift.store import StorageFault, Store
from covshift.store.guard import GuardedConnection

from .helpers import SMALL_SWEEP, dump, integrity, statuses, sweep_file

SWEEP = (
    SMALL_SWEEP.replace("[0.1, 0.5, 2.0]", "[0.5]")
    .replace("seeds = 3", "seeds = 1")
    .replace("steps = 60", "steps = 100")
)
_WRITES = ("INSERT", "UPDATE", "DELETE", "COMMIT")


class _Disk:
    """Counts the store's writes and checkpoint files, and fails them from the
    ``fail_at``-th on (``times`` of them; None: for good, a disk that stays full)."""

    def __init__(
        self,
        what: str,
        fail_at: int,
        times: int | None,
        message: str = "database or disk is full",
    ) -> None:
        self.what, self.fail_at, self.times, self.message = what, fail_at, times, message
        self.seen = self.failed = 0

    def hit(self, what: str) -> bool:
        if what != self.what:
            return False
        self.seen += 1
        if self.seen < self.fail_at or (self.times is not None and self.failed >= self.times):
            return False
        self.failed += 1
        return True


class _FillingConnection:
    """An SQLite connection whose writes fail as SQLite's do on a full disk."""

    def __init__(self, db: sqlite3.Connection, disk: _Disk) -> None:
        self.db, self.disk = db, disk

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith(_WRITES) and self.disk.hit("store"):
            raise sqlite3.OperationalError(self.disk.message)
        return self.db.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        if self.disk.hit("store"):
            raise sqlite3.OperationalError(self.disk.message)
        return self.db.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def close(self) -> None:
        self.db.close()


def _fill(monkeypatch: pytest.MonkeyPatch, disk: _Disk) -> None:
    real_init = GuardedConnection.__init__
    real_write = checkpoint_files._write_file

    def init(self: GuardedConnection, db: sqlite3.Connection, path: Path) -> None:
        real_init(self, _FillingConnection(db, disk), path)  # type: ignore[arg-type]

    def write(path: Path, data: bytes) -> None:
        if disk.hit("checkpoint"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(GuardedConnection, "__init__", init)
    monkeypatch.setattr(checkpoint_files, "_write_file", write)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(str(sweep_file(tmp, SWEEP)))
    with Store(tmp / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1))
    return dump(tmp / "ref.db")


# (what fills up, at which of its writes, how many times: None = it stays full)
MOMENTS = [
    ("store", 1, None),  # saving the experiment, before any point
    ("store", 2, None),  # claiming the first point
    ("store", 5, None),  # the first point's first records
    ("store", 30, None),  # the middle of the first point
    ("store", 75, None),  # the second point
    ("store", 30, 1),  # one failed write: the store can still take the run's end
    ("checkpoint", 1, None),  # the first checkpoint
    ("checkpoint", 7, None),  # a later one (a checkpoint is two files)
    ("checkpoint", 7, 1),
]


@pytest.mark.parametrize(("what", "fail_at", "times"), MOMENTS)
def test_a_full_disk_at_any_moment_stops_cleanly_and_the_next_call_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reference: dict,
    what: str,
    fail_at: int,
    times: int | None,
) -> None:
    config = load_config(str(sweep_file(tmp_path, SWEEP)))
    db = tmp_path / "c.db"
    Store(db).close()
    disk = _Disk(what, fail_at, times)
    with monkeypatch.context() as patch:
        _fill(patch, disk)
        with Store(db) as store, pytest.raises(StorageFault) as caught:
            run_experiment(config, store, backend=InlineBackend(threads=1))
    assert disk.failed >= 1
    text = str(caught.value)
    if what == "store":
        assert text.startswith(f"{db}: cannot write it: the disk is full (SQLite: database")
    else:
        assert text.startswith(f"{tmp_path / 'checkpoints'}")
        assert "cannot write it: no space is left on the device" in text
    assert text.endswith("run the same command again: it resumes.")
    runs = {r.id: r for r in Store(db, create=False).runs()}
    training = [r for r in runs.values() if r.status not in ("finished",)]
    assert len(training) <= 1  # the sweep stopped at the first fault
    for run in training:
        # Closed where the store took it, else left running, and the message says which.
        if run.status == "interrupted":
            assert f"Run {run.id} ({run.name.partition('/')[2]}) was closed as interrupted." in text
            assert run.error.startswith("stopped: cannot write it")
        else:
            assert run.status == "running"
            assert f"Run {run.id} ({run.name.partition('/')[2]}) could not be closed" in text
            assert "`covshift clean` closes it, and the next run resumes it" in text
    if what == "checkpoint" or times == 1:
        assert [r.status for r in training] == ["interrupted"]
    assert integrity(db) == "ok"
    # Space again: the same call resumes, and ends with the uninterrupted numbers.
    with Store(db) as store:
        run_experiment(config, store, backend=InlineBackend(threads=1))
    assert dump(db) == reference
    assert {s for _, s in statuses(db)} == {"finished"} and integrity(db) == "ok"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("database or disk is full", "cannot write it: the disk is full"),
        ("disk I/O error", "an I/O error on the file"),
        ("attempt to write a readonly database", "the store file is read-only"),
    ],
)
def test_the_command_line_says_it_in_one_message_with_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    message: str,
    said: str,
) -> None:
    from covshift.cli.entry import run_app

    sweep_file(tmp_path, SWEEP)
    db = tmp_path / "c.db"
    Store(db).close()
    disk = _Disk("store", 12, None, message)
    _fill(monkeypatch, disk)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["covshift", "run", "sweep.toml", "--db", str(db), "-q", "--workers", "1"]
    )
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            run_app()
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert done.value.code == 2, (err, disk.seen, disk.failed)
    flat = " ".join(err.split())
    assert flat.startswith(f"Error: {db}: {said}") and flat.count("Error:") == 1
    assert "Traceback" not in err and "bug in covshift" not in err
    assert "could not be closed" in flat and "covshift clean" in flat


def test_a_run_left_running_by_a_killed_worker_is_named_too(tmp_path: Path) -> None:
    """A pool worker that did not stop in time is killed: its run stays marked
    running, and the fault's message names it with what to do."""
    import subprocess

    from covshift.experiments import plan_sweep
    from covshift.experiments.backends.base import claim_point
    from covshift.experiments.sweep import run_sweep

    config = load_config(str(sweep_file(tmp_path, SWEEP)))
    db = tmp_path / "c.db"
    plan = plan_sweep(config, db)

    class KilledWorker:
        name, workers, threads = "local", 2, 1

        def run(self, points: Any, context: Any, events: Any) -> Any:
            with Store(db) as store:
                run = claim_point(store, points[1], context, 1).run
                gone = subprocess.Popen(["true"])
                gone.wait()
                store._db.execute("UPDATE runs SET pid = ? WHERE id = ?", (gone.pid, run.id))
            raise StorageFault(db, "cannot write it: the disk is full")

    with Store(db) as store, pytest.raises(StorageFault) as caught:
        run_sweep(plan, store, KilledWorker())  # type: ignore[arg-type]
    name = plan.points[1].name
    assert (
        f"Run 1 ({name}) stays marked running (its process stopped before it could close "
        "it): `covshift clean` closes it, and the next run resumes it."
    ) in str(caught.value)
