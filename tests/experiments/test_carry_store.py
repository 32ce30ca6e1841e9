"""scripts/carry_store.py: a store and its unfinished runs' checkpoints, carried to
another folder, resume there to the numbers of a run never interrupted."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from covshift.experiments import load_config, plan_sweep, run_experiment
from covshift.experiments.backends import InlineBackend
from covshift.store import Store

from .helpers import dump, integrity, interrupt_nth_point, load_script, statuses, sweep_file

carry_store = load_script("carry_store")


def test_a_carried_store_resumes_to_the_numbers_of_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(str(sweep_file(tmp_path)))
    with Store(tmp_path / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
    reference = dump(tmp_path / "ref.db")

    undo = interrupt_nth_point(monkeypatch, 5, at=45)
    first = tmp_path / "first-machine"
    first.mkdir()
    with Store(first / "covshift.db") as store:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
    undo()

    archive = tmp_path / "carried.tar.xz"
    said = carry_store.pack(first / "covshift.db", archive)
    assert "4 finished" in said and "1 interrupted" in said and "1 checkpoint(s)" in said
    shutil.rmtree(first)  # the first machine is gone

    second = tmp_path / "second-machine"
    said = carry_store.unpack(archive, second)
    assert "4 finished, 1 interrupted" in said
    db = second / "covshift.db"
    assert integrity(db) == "ok"
    assert len(list((second / "checkpoints").glob("*.pt"))) == 1
    with Store(db) as store:
        interrupted = next(r for r in store.runs() if r.status == "interrupted")
        assert store.checkpoint_path(interrupted.id).is_file()  # found under the copy's id
        plan = plan_sweep(config, db)
        assert len(plan.to_run) == 14  # 13 new and the interrupted one, resumed
        run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
    assert dump(db) == reference
    assert {s for _, s in statuses(db)} == {"finished"} and len(statuses(db)) == 18


def test_a_store_with_a_running_run_is_not_packed(tmp_path: Path) -> None:
    with Store(tmp_path / "covshift.db") as store:
        store.start_run("busy", config={"lr": 0.1}, seed=0)
    with pytest.raises(SystemExit, match=r"runs marked running \(ids 1\).*covshift clean"):
        carry_store.pack(tmp_path / "covshift.db", tmp_path / "a.tar.xz")
    assert not (tmp_path / "a.tar.xz").exists()


def test_unpack_never_overwrites_a_store(tmp_path: Path) -> None:
    with Store(tmp_path / "src" / "covshift.db") as store:
        run = store.start_run("done", config={"lr": 0.1}, seed=0)
        store.finish_run(run, "finished")
    archive = tmp_path / "a.tar.xz"
    carry_store.pack(tmp_path / "src" / "covshift.db", archive)
    target = tmp_path / "target"
    target.mkdir()
    (target / "covshift.db").write_bytes(b"results of something else")
    with pytest.raises(SystemExit, match="exists; unpack into another folder"):
        carry_store.unpack(archive, target)
    assert (target / "covshift.db").read_bytes() == b"results of something else"
    with pytest.raises(SystemExit, match="exists; give a new archive name"):
        carry_store.pack(tmp_path / "src" / "covshift.db", archive)


def test_pack_makes_the_archive_s_folder(tmp_path: Path) -> None:
    """`git rm` of the last archive in a folder removes the folder: packing the next one
    to the same path must not fail for it."""
    with Store(tmp_path / "src" / "covshift.db") as store:
        run = store.start_run("done", config={"lr": 0.1}, seed=0)
        store.finish_run(run, "finished")
    archive = tmp_path / "results" / "full-run" / "a.tar.xz"
    said = carry_store.pack(tmp_path / "src" / "covshift.db", archive)
    assert said.startswith(f"packed {tmp_path / 'src' / 'covshift.db'} into {archive}")
    assert "runs 1 finished" in said
    assert carry_store.unpack(archive, tmp_path / "out").endswith("runs 1 finished")


def test_the_copy_holds_what_the_store_held_while_it_is_open(tmp_path: Path) -> None:
    """VACUUM INTO reads one snapshot, WAL included: rows written but not yet
    checkpointed into the main file are in the copy."""
    db = tmp_path / "src" / "covshift.db"
    with Store(db) as store:
        run = store.start_run("done", config={"lr": 0.1}, seed=0)
        store.log_scalars(run, step=10, values={"loss": 0.5})
        store.finish_run(run, "finished")
        carry_store.pack(db, tmp_path / "a.tar.xz")  # the store still open
    carry_store.unpack(tmp_path / "a.tar.xz", tmp_path / "out")
    con = sqlite3.connect(tmp_path / "out" / "covshift.db")
    assert con.execute("SELECT name, step, value FROM scalars").fetchall() == [("loss", 10, 0.5)]
    con.close()


def test_a_pack_that_fails_leaves_no_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(tmp_path / "src" / "covshift.db") as store:
        run = store.start_run("done", config={"lr": 0.1}, seed=0)
        store.finish_run(run, "finished")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(carry_store.tarfile.TarFile, "add", disk_full)
    with pytest.raises(OSError, match="No space left"):
        carry_store.pack(tmp_path / "src" / "covshift.db", tmp_path / "a.tar.xz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no archive, no .partial
