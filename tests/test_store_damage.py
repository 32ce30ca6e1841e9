"""A damaged store is refused when opened, by name, with what is missing and what to
do, and left byte for byte as it was: a table, a column, a key or an index gone, a
file truncated at any length, another kind of file; damage that only shows later
(pages SQLite cannot read) is said the same way, never as SQLite's traceback."""

from __future__ import annotations

import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from covshift.store import SCHEMA_VERSION, Store, StoreDamagedError, StoreError
from covshift.store.versions import promise


def _filled(path: Path) -> Path:
    """A store with a finished run, its series and probe records, and an experiment."""
    with Store(path) as store:
        run = store.start_run("net", config={"lr": 0.1}, seed=0, experiment="exp-1", point="p")
        for step in range(0, 2000, 10):
            store.log_scalars(run, step, {"loss": 1.0 / (step + 1), "test_accuracy": 0.5})
            store.log_probe(run, step, "fc", {"mean": np.arange(64, dtype=np.float32)})
        store.finish_run(run, "finished")
        store.record_event(run, "checkpoint_damaged", "a note", path="x.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # WAL folded in
    return path


def _sql(path: Path, script: str) -> None:
    db = sqlite3.connect(path)
    db.executescript(script)
    db.commit()
    db.close()


def _schema(path: Path) -> dict[str, object]:
    """Every table's columns and unique keys, and the named indexes, as SQLite lists them."""
    db = sqlite3.connect(path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    out: dict[str, object] = {}
    for table in tables:
        if table == "sqlite_sequence":
            continue
        info = db.execute(f"PRAGMA table_info({table})").fetchall()
        keys = {frozenset(r[1] for r in info if r[5])}
        for row in db.execute(f"PRAGMA index_list({table})").fetchall():
            columns = frozenset(c[2] for c in db.execute(f"PRAGMA index_info({row[1]})"))
            if row[2]:
                keys.add(columns)
            if row[3] == "c":
                out[f"index {row[1]}"] = (table, tuple(sorted(columns)))
        out[table] = ([r[1] for r in info], keys)
    db.close()
    return out


def test_the_current_promise_is_what_a_new_store_holds(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Store(path).close()
    expected = promise(SCHEMA_VERSION)
    found = _schema(path)
    want: dict[str, object] = {}
    for name, table in expected.tables.items():
        want[name] = (list(table.columns), {frozenset(k) for k in table.keys})
    for name, index in expected.indexes.items():
        want[f"index {name}"] = (index.table, tuple(sorted(index.columns)))
    assert found == want


def test_a_version_3_store_gains_the_events_table_keeping_every_row(tmp_path: Path) -> None:
    path = _filled(tmp_path / "v3.db")
    _sql(path, "DROP TABLE events; UPDATE meta SET value = '3' WHERE key = 'schema_version';")
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "finished" and len(store.scalars(run.id, "loss")[0]) == 200
        assert store.events() == []
        store.record_event(run.id, "checkpoint_damaged", "m", path="f")
        assert [e.message for e in store.events(run.id)] == ["m"]
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("4",)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


DAMAGE = {
    "table scalars": "DROP TABLE scalars",
    "table runs": "PRAGMA foreign_keys=OFF; DROP TABLE runs",
    "table experiments": "DROP TABLE experiment_points; DROP TABLE experiments",
    "table events": "DROP TABLE events",
    "column runs.threads": "ALTER TABLE runs DROP COLUMN threads",
    "column probe_records.unit_rule": "ALTER TABLE probe_records DROP COLUMN unit_rule",
    "column scalars.value": "ALTER TABLE scalars DROP COLUMN value",
    "index runs_experiment": "DROP INDEX runs_experiment",
    "index events_run": "DROP INDEX events_run",
    # A table rebuilt without its key: INSERT OR REPLACE would then keep duplicates.
    "the unique key of scalars (run_id, name, step)": (
        "CREATE TABLE s2 AS SELECT * FROM scalars; DROP TABLE scalars;"
        " ALTER TABLE s2 RENAME TO scalars"
    ),
}


@pytest.mark.parametrize("missing", sorted(DAMAGE))
@pytest.mark.parametrize("create", [True, False])
def test_a_store_missing_what_its_version_promises_is_refused_untouched(
    tmp_path: Path, missing: str, create: bool
) -> None:
    path = _filled(tmp_path / "covshift.db")
    _sql(path, DAMAGE[missing])
    before = path.read_bytes()
    with pytest.raises(StoreDamagedError) as caught:
        Store(path, create=create)
    text = str(caught.value)
    assert text.startswith(f"{path}: the store is damaged: schema version 4 has {missing}")
    assert "which this file lacks" in text and "leaves the file as it is" in text
    if missing.startswith("index"):
        assert f"sqlite3 {path} 'CREATE INDEX {missing.split()[1]} ON" in text
    else:
        assert "Restore it from a backup, or start a new store with --db NEW.db" in text
    assert path.read_bytes() == before  # not migrated, repaired, nor switched to WAL
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_several_missing_things_are_all_named(tmp_path: Path) -> None:
    path = _filled(tmp_path / "covshift.db")
    _sql(path, "DROP TABLE scalars; ALTER TABLE runs DROP COLUMN error; DROP INDEX events_run")
    with pytest.raises(StoreDamagedError) as caught:
        Store(path)
    assert (
        "has column runs.error, table scalars and index events_run on events (run_id), "
        "which this file lacks"
    ) in str(caught.value)


def test_an_older_store_is_checked_against_its_own_version(tmp_path: Path) -> None:
    path = _filled(tmp_path / "old.db")
    # A version-2 store (no unit columns, no events) is whole: it migrates.
    _sql(
        path,
        "DROP TABLE events; ALTER TABLE probe_records DROP COLUMN unit_dim;"
        " ALTER TABLE probe_records DROP COLUMN unit_source;"
        " ALTER TABLE probe_records DROP COLUMN unit_rule;"
        " UPDATE meta SET value = '2' WHERE key = 'schema_version';",
    )
    backup = path.read_bytes()
    with Store(path) as store:
        assert len(store.runs()) == 1
    # The same store that lost its experiments table is refused, not migrated (the
    # migration would create an empty one).
    path.write_bytes(backup)
    _sql(path, "DROP TABLE experiment_points")
    before = path.read_bytes()
    with pytest.raises(StoreDamagedError, match="schema version 2 has table experiment_points"):
        Store(path)
    assert path.read_bytes() == before


def test_a_store_without_its_meta_table_is_damaged_not_foreign(tmp_path: Path) -> None:
    path = _filled(tmp_path / "covshift.db")
    _sql(path, "DROP TABLE meta")
    with pytest.raises(StoreDamagedError, match=r"its meta table .* is missing"):
        Store(path)


def test_a_store_that_lost_its_version_row_is_not_migrated_as_version_1(tmp_path: Path) -> None:
    path = _filled(tmp_path / "covshift.db")
    _sql(path, "DELETE FROM meta WHERE key = 'schema_version'")
    before = path.read_bytes()
    with pytest.raises(StoreDamagedError, match="lost its schema_version row"):
        Store(path)  # a migration from 1 would rebuild runs without its later columns
    assert path.read_bytes() == before


def _truncations(size: int, page: int) -> list[int]:
    return sorted(
        {
            1,
            15,
            16,
            50,
            99,
            100,
            1000,
            page - 1,
            page,
            page + 1,
            2 * page,
            size // 2,
            size - page,
            size - 1,
        }
    )


def test_a_store_truncated_at_any_length_is_refused_by_name(tmp_path: Path) -> None:
    path = _filled(tmp_path / "covshift.db")
    whole = path.read_bytes()
    page = int.from_bytes(whole[16:18], "big")
    assert len(whole) > 8 * page  # several pages to cut
    for length in _truncations(len(whole), page):
        path.write_bytes(whole[:length])
        for create in (True, False):
            with pytest.raises(StoreError) as caught:
                Store(path, create=create)
            text = str(caught.value)
            assert text.startswith(f"{path}: "), (length, text)
            assert "damaged" in text or "not a usable SQLite database" in text, (length, text)
            assert path.read_bytes() == whole[:length], length  # left as it was
    # Cut within the 16-byte magic, the file may be anything: not SQLite's.
    path.write_bytes(whole[:1] + b"x" * 200)
    with pytest.raises(StoreError, match="does not begin with SQLite's header"):
        Store(path)


def test_pages_sqlite_cannot_read_later_are_said_as_damage(tmp_path: Path) -> None:
    path = _filled(tmp_path / "covshift.db")
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    # Overwrite the interior pages with garbage, the header and schema page kept.
    data[2 * page : len(data) - page] = b"\xa5" * (len(data) - 3 * page)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError) as caught, Store(path) as store:
        for run in store.runs():
            store.scalars(run.id, "loss")
        store.start_run("more", config={})
    assert str(caught.value).startswith(f"{path}: the store is damaged: SQLite cannot read it")


# -- the command line ------------------------------------------------------------------


def _cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    from covshift.cli.entry import run_app

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", ["covshift", *args])
    try:
        with pytest.raises(SystemExit) as done:
            run_app()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(done.value.code or 0)


COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "runs": lambda db: ["runs", "--db", str(db)],
    "report": lambda db: ["report", "exp-1", "--db", str(db)],
    "clean": lambda db: ["clean", "--db", str(db)],
    "run": lambda db: ["run", "ioffe2015", "--dataset", "synthetic", "--db", str(db)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("damage", ["table scalars", "index runs_experiment", "truncated"])
def test_commands_refuse_a_damaged_store_with_exit_2_and_no_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    damage: str,
) -> None:
    path = _filled(tmp_path / "covshift.db")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        _sql(path, DAMAGE[damage])
    before = path.read_bytes()
    monkeypatch.chdir(tmp_path)
    code = _cli(monkeypatch, *COMMANDS[command](path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "bug in covshift" not in err
    flat = " ".join(err.split())
    assert f"Error: {path}: the store is damaged" in flat
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing created
