"""The SQLite results store."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from covshift.store import (
    SCHEMA_VERSION,
    ExperimentPoint,
    NewRun,
    Store,
    StoreError,
    pid_alive,
)


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
    with pytest.raises(
        ValueError, match="status must be one of finished, diverged, interrupted, failed"
    ):
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


# -- schema 2: points, claims, divergence, experiments ------------------------------

_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, preset TEXT, experiment TEXT,
    config TEXT NOT NULL, seed INTEGER,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'interrupted', 'failed')),
    started_at TEXT NOT NULL, ended_at TEXT, last_step INTEGER NOT NULL DEFAULT 0,
    python_version TEXT NOT NULL, torch_version TEXT, covshift_version TEXT NOT NULL,
    device TEXT, host TEXT, pid INTEGER, error TEXT);
CREATE TABLE scalars (run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name TEXT NOT NULL, step INTEGER NOT NULL, value REAL, PRIMARY KEY (run_id, name, step));
CREATE TABLE probe_records (run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    layer TEXT NOT NULL, stat TEXT NOT NULL, step INTEGER NOT NULL, dtype TEXT NOT NULL,
    shape TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (run_id, layer, stat, step));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO runs (name, experiment, config, seed, status, started_at, last_step,
    python_version, covshift_version) VALUES
    ('ioffe2015/baseline', 'ioffe2015-old', '{"network": "baseline"}', 0, 'finished',
     '2026-11-25T10:00:00+00:00', 500, '3.11.7', '0.1.0');
INSERT INTO scalars VALUES (1, 'test_accuracy', 0, 0.1), (1, 'test_accuracy', 500, 0.8);
INSERT INTO probe_records VALUES (1, 'h', 'mean', 0, '<f4', '[]', x'0000803f');
"""


def test_version_1_store_migrates_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.close()
    with Store(path) as store:
        (run,) = store.runs()
        assert (run.name, run.status, run.point, run.experiment) == (
            "ioffe2015/baseline",
            "finished",
            None,
            "ioffe2015-old",
        )
        steps, acc = store.scalars(run.id, "test_accuracy")
        assert list(steps) == [0, 500] and list(acc) == [0.1, 0.8]
        _, mean = store.probe(run.id, "h", "mean")
        assert mean.tolist() == [1.0]
        new = store.start_run("n", config={}, point="p1")
        store.finish_run(new, "diverged", diverged_at=40)  # the new status is accepted
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert version == (str(SCHEMA_VERSION),)  # through 2 to the current version


def _version_2_store(path: Path) -> None:
    """A store as schema 2 wrote it: probe_records without the unit columns."""
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.close()
    Store(path).close()  # 1 -> current; then take the columns away again, as in schema 2
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE old AS SELECT run_id, layer, stat, step, dtype, shape, data
            FROM probe_records;
        DROP TABLE probe_records;
        CREATE TABLE probe_records (run_id INTEGER NOT NULL REFERENCES runs (id)
            ON DELETE CASCADE, layer TEXT NOT NULL, stat TEXT NOT NULL, step INTEGER NOT NULL,
            dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL,
            PRIMARY KEY (run_id, layer, stat, step));
        INSERT INTO probe_records SELECT * FROM old;
        DROP TABLE old;
        UPDATE meta SET value = '2' WHERE key = 'schema_version';
        """
    )
    db.commit()
    db.close()


def test_version_2_store_gains_the_unit_columns_keeping_every_record(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    _version_2_store(path)
    with Store(path) as store:
        (run,) = store.runs()
        _, mean = store.probe(run.id, "h", "mean")
        assert mean.tolist() == [1.0]  # the old record reads as before
        (old,) = store.probe_units(run.id, "h")
        assert (old.step, old.dim, old.source, old.rule) == (0, None, None, None)
        store.log_probe(
            run.id,
            10,
            "h",
            {"mean": np.ones(3, np.float32), "std": np.ones(3, np.float32)},
            unit_dim=2,
            unit_source="layer",
            unit_rule="Linear.out_features=3: axis 2 (last) of (N, 5, 3)",
        )
        store.log_probe(run.id, 20, "h", {"mean": np.ones(3, np.float32)})
        units = store.probe_units(run.id, "h")
        assert [(u.step, u.dim, u.source) for u in units] == [
            (0, None, None),
            (10, 2, "layer"),
            (20, None, None),
        ]
        assert units[1].rule == "Linear.out_features=3: axis 2 (last) of (N, 5, 3)"
    db = sqlite3.connect(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(probe_records)")]
    assert columns[-3:] == ["unit_dim", "unit_source", "unit_rule"]
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_claim_point_states(store: Store) -> None:
    first = store.claim_point(NewRun(point="p", name="e/a", config={"x": 1}, seed=2, threads=3))
    assert first.state == "new" and first.run.point == "p" and first.run.threads == 3
    # The same process claiming again (an earlier attempt of its own) resumes the run.
    assert store.claim_point(NewRun(point="p", name="e/a", config={}, threads=1)).state == "resume"
    store.finish_run(first.run.id, "interrupted")
    again = store.claim_point(NewRun(point="p", name="e/a", config={}, threads=1))
    assert again.state == "resume" and again.run.id == first.run.id
    assert again.run.threads == 3  # a resumed run keeps its thread count
    store.finish_run(first.run.id, "diverged", diverged_at=7)
    done = store.claim_point(NewRun(point="p", name="e/a", config={}))
    assert done.state == "done" and done.run.diverged_at == 7
    assert len(store.runs()) == 1


def _claim_and_hold(path: str, point: str, ready, release) -> None:
    with Store(path) as store:
        store.claim_point(NewRun(point=point, name="held", config={}))
        ready.set()
        release.wait(60)


def test_a_live_owner_makes_the_point_busy_and_a_dead_one_stale(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_claim_and_hold, args=(str(path), "p", ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with Store(path) as store:
            busy = store.claim_point(NewRun(point="p", name="held", config={}))
            assert busy.state == "busy" and busy.run.pid == proc.pid
    finally:
        release.set()
        proc.join(60)
    with Store(path) as store:
        assert store.runs()[0].status == "stale"
        taken = store.claim_point(NewRun(point="p", name="held", config={}))
        assert taken.state == "resume" and taken.run.status == "running"


def _claim_many(path: str, points: list[str], out) -> None:
    with Store(path) as store:
        out.put([store.claim_point(NewRun(point=p, name=p, config={})).state for p in points])


def test_concurrent_claims_give_each_point_to_one_process(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    Store(path).close()
    points = [f"p{i}" for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(str(path), points, out)) for _ in range(3)]
    for p in procs:
        p.start()
    states = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    for i in range(len(points)):
        column = [s[i] for s in states]
        # One process created the run; the others found it held by a live process,
        # or (when the creator had already exited) took the stale run over.
        assert column.count("new") == 1, column
    with Store(path) as store:
        assert sorted(r.point for r in store.runs()) == sorted(points)


def test_zombies_are_not_alive() -> None:
    import os
    import time

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child exits at once
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_alive(pid)  # exited, not yet reaped: a zombie
        assert os.waitpid(pid, os.WNOHANG)[0] == pid  # it was indeed still unreaped
    finally:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    assert pid_alive(os.getpid())


def test_experiments_round_trip(store: Store) -> None:
    grid = [
        ExperimentPoint("a1", 0, "baseline", 0, {"optimizer.lr": 0.1}),
        ExperimentPoint("b1", 1, "batchnorm", 0, {"optimizer.lr": 0.1}),
    ]
    store.save_experiment("exp-1", "exp", {"name": "exp"}, grid)
    store.save_experiment("exp-1", "exp", {"name": "changed"}, grid)  # idempotent
    assert store.experiment_config("exp-1") == {"name": "exp"}
    assert store.experiment_points("exp-1") == grid
    assert store.experiment_config("nope") is None and store.experiment_points("nope") == []
    run = store.claim_point(NewRun(point="b1", name="exp/batchnorm", config={})).run
    assert [r.id for r in store.runs(experiment="exp-1")] == [run.id]
    assert [e[0] for e in store.experiments()] == ["exp-1"]
    assert set(store.runs_of_points(["a1", "b1"])) == {"b1"}


def test_finish_run_checks_diverged_at(store: Store) -> None:
    run = store.start_run("a", config={})
    with pytest.raises(ValueError, match="diverged_at"):
        store.finish_run(run, "diverged")
    with pytest.raises(ValueError, match="diverged_at"):
        store.finish_run(run, "finished", diverged_at=3)


def test_seed_out_of_range_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="0 <= seed < 2\\*\\*63"):
        store.start_run("a", config={}, seed=2**64)
    assert store.runs() == []
