"""The SQLite results store."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from covshift.store import SCHEMA_VERSION, Store, StoreError


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.db"
    with Store(path) as store:
        run = store.start_run(
            "exp/a",
            config={"lr": 0.5, "nested": {"x": [1, 2]}},
            seed=3,
            preset="p",
            experiment="exp-1",
            device="cpu",
            torch_version="9.9",
        )
        store.log_scalars(run, 0, {"test_accuracy": 0.1, "test_loss": 2.3})
        store.log_scalars(run, 500, {"test_accuracy": 0.8})
        q = np.arange(12, dtype=np.float32).reshape(3, 4)
        store.log_probe(run, 0, "hidden.0.act", {"quantiles": q, "mean": q[1]})
        store.log_probe(run, 100, "hidden.0.act", {"quantiles": q + 1, "mean": q[1] + 1})
        store.finish_run(run, "finished")
    with Store(path) as store:  # reopened from disk
        info = store.run(run)
        assert info.name == "exp/a" and info.config == {"lr": 0.5, "nested": {"x": [1, 2]}}
        assert (info.seed, info.preset, info.experiment, info.status) == (
            3,
            "p",
            "exp-1",
            "finished",
        )
        assert info.ended_at is not None and info.last_step == 500
        assert info.torch_version == "9.9" and info.python_version.count(".") == 2
        steps, acc = store.scalars(run, "test_accuracy")
        np.testing.assert_array_equal(steps, [0, 500])
        np.testing.assert_allclose(acc, [0.1, 0.8])
        assert store.scalar_names(run) == ["test_accuracy", "test_loss"]
        steps, quantiles = store.probe(run, "hidden.0.act", "quantiles")
        np.testing.assert_array_equal(steps, [0, 100])
        assert quantiles.dtype == np.float32 and quantiles.shape == (2, 3, 4)
        np.testing.assert_array_equal(quantiles[1], q + 1)
        assert store.probe_layers(run) == ["hidden.0.act"]
        assert store.probe_stats(run, "hidden.0.act") == ["mean", "quantiles"]


def test_probe_arrays_keep_their_shape_scalars_included(store: Store) -> None:
    run = store.start_run("r", config={})
    record = {"count": np.array(1000, dtype=np.int64), "hist": np.arange(6).reshape(2, 3)[:, ::2]}
    store.log_probe(run, 0, "l", record)
    store.log_probe(run, 5, "l", {k: v + 1 for k, v in record.items()})
    _, count = store.probe(run, "l", "count")
    assert count.shape == (2,) and count.dtype == np.int64  # 0-d per record: (records,)
    np.testing.assert_array_equal(count, [1000, 1001])
    _, hist = store.probe(run, "l", "hist")  # a non-contiguous view is stored as its values
    np.testing.assert_array_equal(hist, [[[0, 2], [3, 5]], [[1, 3], [4, 6]]])


def test_runs_newest_first_and_by_experiment(store: Store) -> None:
    a = store.start_run("a", config={}, experiment="e1")
    b = store.start_run("b", config={}, experiment="e2")
    c = store.start_run("c", config={}, experiment="e1")
    assert [r.id for r in store.runs()] == [c, b, a]
    assert [r.id for r in store.runs(experiment="e1")] == [c, a]


def test_wal_mode_and_schema_version(store: Store) -> None:
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "c.db").close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        Store(tmp_path / "c.db")


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "other.db")
    db.execute("CREATE TABLE users (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a covshift store"):
        Store(tmp_path / "other.db")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Store(tmp_path / "junk.db")


def test_bad_status_and_unknown_run(store: Store) -> None:
    run = store.start_run("a", config={})
    with pytest.raises(ValueError, match="status must be one of finished, interrupted, failed"):
        store.finish_run(run, "done")
    with pytest.raises(StoreError, match="no run with id 999"):
        store.run(999)
    with pytest.raises(StoreError, match="no probe records"):
        store.probe(run, "x", "quantiles")


def test_reopen_run(store: Store) -> None:
    run = store.start_run("a", config={})
    store.finish_run(run, "interrupted")
    store.reopen_run(run)
    assert store.run(run).status == "running" and store.run(run).ended_at is None
    store.finish_run(run, "finished")
    with pytest.raises(StoreError, match="is finished"):
        store.reopen_run(run)


def _start_and_die(path: str) -> None:
    store = Store(path)
    run = store.start_run("killed", config={})
    store.log_scalars(run, 10, {"loss": 1.0})
    # exits without finish_run, like a process killed with SIGKILL


def test_killed_process_shows_as_stale(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    proc = multiprocessing.get_context("spawn").Process(target=_start_and_die, args=(str(path),))
    proc.start()
    proc.join(60)
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "stale"
        steps, values = store.scalars(run.id, "loss")
        assert list(steps) == [10] and list(values) == [1.0]
