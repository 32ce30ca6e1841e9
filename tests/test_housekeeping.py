"""Store housekeeping: stale runs closed or removed, orphan checkpoints found, and
nothing else touched (live runs, resumable runs, another store's checkpoints)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from covshift.store import (
    Store,
    close_stale_runs,
    orphan_checkpoints,
    stale_runs,
)


def _start_and_die(path: str, names: list[str]) -> None:
    """Start runs and exit without closing them, as a process killed outright does."""
    store = Store(path)
    for name in names:
        run = store.start_run(name, config={})
        store.log_scalars(run, 10, {"loss": 1.0})
        store.log_probe(run, 10, "fc", {"mean": [1.0, 2.0]})
        store.checkpoint_path(run).parent.mkdir(exist_ok=True)
        store.checkpoint_path(run).write_bytes(b"state")


def _kill_runs(path: Path, names: list[str]) -> None:
    proc = multiprocessing.get_context("spawn").Process(
        target=_start_and_die, args=(str(path), names)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0


def _touch(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def _layout(tmp_path: Path) -> tuple[Store, dict[str, Path]]:
    """A store with two stale runs, a finished, an interrupted and a live run, beside
    a second store, with checkpoints of every kind in their shared folder."""
    path = tmp_path / "a.db"
    _kill_runs(path, ["stale-1", "stale-2"])
    store = Store(path)
    finished = store.start_run("finished", config={})
    store.finish_run(finished, "finished")
    interrupted = store.start_run("interrupted", config={})
    store.finish_run(interrupted, "interrupted")
    live = store.start_run("live", config={})  # this process: alive
    other = Store(tmp_path / "b.db")
    other_run = other.start_run("other", config={})
    folder = tmp_path / "checkpoints"
    files = {
        "finished": _touch(store.checkpoint_path(finished)),
        "interrupted": _touch(store.checkpoint_path(interrupted)),
        "live": _touch(store.checkpoint_path(live)),
        "live.tmp": _touch(store.checkpoint_path(live).with_suffix(".pt.tmp")),
        "unknown run": _touch(store.checkpoint_path(999)),
        "interrupted.tmp": _touch(store.checkpoint_path(interrupted).with_suffix(".pt.tmp")),
        "other store": _touch(other.checkpoint_path(other_run)),
        "gone store": _touch(folder / "0123456789ab-run-1.pt"),
        "not ours": _touch(folder / "notes.txt"),
    }
    other.close()
    return store, files


def test_orphans_are_exactly_the_checkpoints_nothing_will_load(tmp_path: Path) -> None:
    store, files = _layout(tmp_path)
    with store:
        found = {o.path: o.reason for o in orphan_checkpoints(store)}
        finished, interrupted = store.runs()[2], store.runs()[1]
        assert found == {
            files["finished"]: f"run {finished.id} is finished",
            files["unknown run"]: "run 999 is not in the store",
            files["interrupted.tmp"]: (
                f"an unfinished save of run {interrupted.id}, which is interrupted"
            ),
            files["gone store"]: f"its store (0123456789ab) is not in {tmp_path}",
        }
        assert all(o.size == 10 for o in orphan_checkpoints(store))


def test_stale_runs_are_marked_failed_and_stay_resumable(tmp_path: Path) -> None:
    store, _ = _layout(tmp_path)
    with store:
        stale = stale_runs(store)
        assert [r.name for r in stale] == ["stale-2", "stale-1"]
        assert all(r.pid != os.getpid() for r in stale)
        closed = close_stale_runs(store, stale, remove=False)
        assert [r.id for r in closed] == [r.id for r in stale]
        for run in stale:
            after = store.run(run.id)
            assert after.status == "failed" and after.ended_at is not None
            assert (
                after.error
                == f"stale: its process {run.pid} on {run.host} ended without closing it"
            )
            assert store.checkpoint_path(run.id).exists()  # resumable
            assert list(store.scalars(run.id, "loss")[0]) == [10]
        assert stale_runs(store) == []
        statuses = {r.name: r.status for r in store.runs()}
        assert statuses["live"] == "running" and statuses["interrupted"] == "interrupted"


def test_removed_stale_runs_take_their_records_and_checkpoints(tmp_path: Path) -> None:
    store, _ = _layout(tmp_path)
    with store:
        stale = stale_runs(store)
        close_stale_runs(store, stale, remove=True)
        assert {r.name for r in store.runs()} == {"finished", "interrupted", "live"}
        for run in stale:
            assert not store.checkpoint_path(run.id).exists()
            assert len(store.scalars(run.id, "loss")[0]) == 0
        db = store._db
        assert db.execute("SELECT COUNT(*) FROM probe_records").fetchone() == (0,)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_a_run_claimed_again_since_it_was_listed_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    _kill_runs(path, ["stale"])
    with Store(path) as store:
        (listed,) = stale_runs(store)
        store.reopen_run(listed.id)  # another sweep resumes it meanwhile
        assert close_stale_runs(store, [listed], remove=False) == []
        assert close_stale_runs(store, [listed], remove=True) == []
        now = store.run(listed.id)
        assert now.status == "running" and now.pid == os.getpid()
