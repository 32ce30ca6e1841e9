"""Sweeps on this machine: the process pool and the in-process backend, resumption,
killed workers, divergence, and nothing written for a malformed sweep."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from covshift.experiments import load_config, plan_sweep, run_experiment
from covshift.experiments.backends import InlineBackend, PoolBackend
from covshift.store import Store

from .helpers import (
    SMALL_SWEEP,
    InterruptAt,
    covshift,
    dump,
    integrity,
    interrupt_nth_point,
    statuses,
    sweep_file,
)


@pytest.fixture(scope="module")
def inline_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small sweep run point after point in this process, with 1 torch thread."""
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(str(sweep_file(tmp)))
    with Store(tmp / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1))
    return dump(tmp / "ref.db")


@pytest.fixture(scope="module")
def one_at_a_time_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small sweep with --members 1: every point alone, today's path."""
    tmp = tmp_path_factory.mktemp("one-at-a-time")
    config = load_config(str(sweep_file(tmp)))
    with Store(tmp / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
    return dump(tmp / "ref.db")


def test_two_workers_record_18_points_equal_to_one_process(
    tmp_path: Path, inline_reference: dict
) -> None:
    path = sweep_file(tmp_path)
    proc = covshift("run", str(path), "--workers", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "18 points (2 networks x 3 optimizer.lr x 3 seeds); 18 to run" in proc.stderr
    assert "local backend, 2 workers x 1 thread; estimated" in proc.stderr
    summary = json.loads(proc.stdout)
    db = tmp_path / "covshift-out" / "covshift.db"
    assert statuses(db) and {s for _, s in statuses(db)} == {"finished"}
    assert len(statuses(db)) == 18 and integrity(db) == "ok"
    # Workers x threads = 2 x 1: bitwise the numbers of one process with one thread.
    assert dump(db) == inline_reference
    assert summary["grid"]["points"] == 18 and len(summary["points"]) == 18
    (claim,) = summary["claims"][:1]
    assert {"estimate", "interval", "verdict", "rule", "seeds"} <= set(claim)
    assert len(summary["claims"]) == 3  # one per learning rate (the free axis)
    report = tmp_path / summary["report"]
    for name in ("claims.json", "claims.html", "points.csv", "index.html", "summary.json"):
        assert (report.parent / name).is_file(), name
    # Again: nothing to run, the same report.
    again = covshift("run", str(path), "--workers", "2", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "18 already recorded" in again.stderr and "0 to run" in again.stderr
    assert json.loads(again.stdout)["claims"] == summary["claims"]


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (("optimizer.lr = [", "optimizer.lrate = ["), r"sweep\.optimizer\.lrate: 'lrate' is not"),
        (("[0.1, 0.5, 2.0]", "[0.1, -0.5]"), r"sweep\.optimizer\.lr\[1\] = -0\.5: optimizer\.lr"),
        (("[0.1, 0.5, 2.0]", "[]"), r"sweep\.optimizer\.lr: the axis is empty"),
        (("steps = 60", "steps = = 60"), r"not valid TOML"),
        (("width = 16", "width = 16\nnorm_kwargs = { momentm = 0.1 }"), r"cannot be built"),
        (("examples = 100", "examples = 5000"), r"probe\.examples = 5000 .* 1000 test examples"),
        (("batch_size = 30", "batch_size = 7000"), r"batch_size = 7000 .* 6000 training"),
        (("[probe]", '[probe]\nlayers = ["hidden.*.nope"]'), r"probe\.layers: .*hidden\.\*\.nope"),
    ],
)
def test_malformed_sweep_writes_nothing(
    tmp_path: Path, replace: tuple[str, str], message: str
) -> None:
    import re

    path = sweep_file(tmp_path, SMALL_SWEEP.replace(*replace))
    proc = covshift("run", str(path), "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert re.search(message, text), text
    assert not (tmp_path / "covshift-out").exists()  # no store, no report, no checkpoint


def test_dry_run_prints_the_points_and_writes_nothing(tmp_path: Path) -> None:
    proc = covshift("run", str(sweep_file(tmp_path)), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "18 points" in proc.stdout and "estimated" in proc.stdout
    assert proc.stdout.count("plain") >= 9 and "lr=2.0" in proc.stdout
    assert not (tmp_path / "covshift-out").exists()


def test_interrupted_sweep_resumes_to_the_same_numbers(
    tmp_path: Path, one_at_a_time_reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-at-a-time path (--members 1), interrupted in its fifth point."""
    config = load_config(str(sweep_file(tmp_path)))
    undo = interrupt_nth_point(monkeypatch, 5, at=45)
    db = tmp_path / "c.db"
    with Store(db) as store:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
        runs = store.runs()
        assert sorted(r.status for r in runs) == ["finished"] * 4 + ["interrupted"]
        assert next(r for r in runs if r.status == "interrupted").last_step == 40
        undo()
        plan = plan_sweep(config, db)
        assert len(plan.to_run) == 14  # 13 new and the interrupted one
        run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
    assert dump(db) == one_at_a_time_reference
    assert {s for _, s in statuses(db)} == {"finished"} and len(statuses(db)) == 18


def test_an_interrupted_batch_resumes_to_the_same_numbers(
    tmp_path: Path, inline_reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched path (the default): Ctrl-C in the second batch closes its members
    as interrupted; the next call puts them in the batch they were saved in."""
    import covshift.experiments.backends.group as group

    config = load_config(str(sweep_file(tmp_path)))
    real = group.train_point_members
    calls = {"n": 0}

    def interrupted_in_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            first = kwargs["callbacks"][0]
            kwargs["callbacks"] = [(*first, InterruptAt(45)), *kwargs["callbacks"][1:]]
        return real(*args, **kwargs)

    monkeypatch.setattr(group, "train_point_members", interrupted_in_the_second_batch)
    db = tmp_path / "c.db"
    with Store(db) as store:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, store, backend=InlineBackend(threads=1), members=4)
        interrupted = [r for r in store.runs() if r.status == "interrupted"]
        assert len(interrupted) == 3 and {r.last_step for r in interrupted} == {40}  # 9 as 3 x 3
        monkeypatch.setattr(group, "train_point_members", real)
        run_experiment(config, store, backend=InlineBackend(threads=1), members=3)
    assert dump(db) == inline_reference  # whatever the batches: the same numbers
    assert {s for _, s in statuses(db)} == {"finished"} and len(statuses(db)) == 18


def _kill_a_worker_once(db: Path, done: threading.Event, killed: list[int]) -> None:
    me = os.getpid()
    deadline = time.monotonic() + 900  # a busy machine may take minutes to start a worker
    while not done.is_set() and time.monotonic() < deadline:
        try:
            with Store(db, create=False) as store:
                for run in store.runs():
                    if run.status == "running" and run.pid != me and run.last_step >= 40:
                        os.kill(run.pid, signal.SIGKILL)
                        killed.append(run.pid)
                        return
        except Exception:
            pass
        time.sleep(0.05)


def test_a_killed_worker_costs_nothing_but_time(tmp_path: Path) -> None:
    text = SMALL_SWEEP.replace("steps = 60", "steps = 400").replace("seeds = 3", "seeds = 1")
    config = load_config(str(sweep_file(tmp_path, text)))
    with Store(tmp_path / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1))
    db = tmp_path / "c.db"
    Store(db).close()
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_once, args=(db, done, killed))
    killer.start()
    try:
        with Store(db) as store:
            result = run_experiment(config, store, backend=PoolBackend(2, 1))
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was caught training"
    assert {o.status for o in result.outcomes} == {"finished"}
    assert len(statuses(db)) == 6 and integrity(db) == "ok"
    assert dump(db) == dump(tmp_path / "ref.db")  # the killed point resumed exactly


DIVERGING = SMALL_SWEEP.replace("[0.1, 0.5, 2.0]", "[0.5, 3000.0]").replace(
    "steps = 60", "steps = 200"
)


def test_a_diverged_run_is_an_outcome_and_the_sweep_goes_on(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, DIVERGING.replace("seeds = 3", "seeds = 2"))
    proc = covshift("run", str(path), "--workers", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rows = {(p["network"], p["axes"]["optimizer.lr"], p["seed"]): p for p in summary["points"]}
    high = [rows[("plain", 3000.0, s)] for s in (0, 1)]
    assert all(p["status"] == "diverged" for p in high)
    assert all(
        p["diverged_at"] is not None and p["final_step"] == p["diverged_at"] < 200 for p in high
    )
    assert all(rows[(n, 0.5, s)]["status"] == "finished" for n in ("plain", "bn") for s in (0, 1))
    assert "diverged" in proc.stderr  # its line in the sweep's log
    runs = covshift("runs", cwd=tmp_path)
    assert "diverged at" in runs.stdout
    # A diverged point is done: running again trains nothing.
    again = covshift("run", str(path), "--workers", "2", cwd=tmp_path)
    assert again.returncode == 0 and "0 to run" in again.stdout


def test_divergence_without_stop_trains_on_and_still_counts(tmp_path: Path) -> None:
    text = DIVERGING.replace("seeds = 3", "seeds = 1") + "[divergence]\nstop = false\n"
    config = load_config(str(sweep_file(tmp_path, text)))
    with Store(tmp_path / "c.db") as store:
        result = run_experiment(config, store, backend=InlineBackend(threads=1))
        outcomes = {o.status for o in result.outcomes}
        assert "diverged" in outcomes
        run = next(r for r in store.runs() if r.status == "diverged")
        assert run.last_step == 200 and run.diverged_at < 200


@pytest.mark.parametrize("kind", ["empty", "tables not yet created"])
def test_planning_over_a_store_left_half_created_finds_nothing_recorded(
    tmp_path: Path, kind: str
) -> None:
    # What a Ctrl-C while the first run created the store leaves; the next run must
    # plan (and then initialise the store) instead of refusing the file.
    import sqlite3

    db = tmp_path / "c.db"
    if kind == "empty":
        db.touch()
    else:
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    before = db.read_bytes()
    plan = plan_sweep(load_config(str(sweep_file(tmp_path))), db)
    assert len(plan.to_run) == len(plan.points) == 18
    assert db.read_bytes() == before  # planning only reads
