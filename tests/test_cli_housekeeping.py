"""The housekeeping commands end to end: ``runs --stale``, ``clean`` and ``check``."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

from covshift.experiments.config_files import load_config
from covshift.experiments.grid import experiment_id
from covshift.store import Store


def covshift(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "covshift.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _start_and_die(path: str) -> None:
    store = Store(path)
    run = store.start_run("killed", config={})
    store.checkpoint_path(run).parent.mkdir(exist_ok=True)
    store.checkpoint_path(run).write_bytes(b"state")


def _store_with_a_stale_run_and_an_orphan(tmp_path: Path) -> tuple[Path, Path]:
    db = tmp_path / "covshift-out" / "covshift.db"
    proc = multiprocessing.get_context("spawn").Process(target=_start_and_die, args=(str(db),))
    proc.start()
    proc.join(120)
    with Store(db) as store:
        done = store.start_run("done", config={})
        store.finish_run(done, "finished")
        orphan = store.checkpoint_path(done)
        orphan.write_bytes(b"x" * 2**20)
    return db, orphan


def test_runs_stale_and_json(tmp_path: Path) -> None:
    db, _ = _store_with_a_stale_run_and_an_orphan(tmp_path)
    listed = covshift("runs", "--stale", "--json", "--db", str(db), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    assert (run["name"], run["status"], run["test_accuracy"]) == ("killed", "stale", None)
    every = json.loads(covshift("runs", "--json", "--db", str(db), cwd=tmp_path).stdout)
    assert [r["status"] for r in every] == ["finished", "stale"]
    table = covshift("runs", "--stale", "--db", str(db), cwd=tmp_path)
    assert "stale runs in" in table.stdout and "killed" in table.stdout


def test_clean_dry_run_changes_nothing_then_clean_closes_and_deletes(tmp_path: Path) -> None:
    db, orphan = _store_with_a_stale_run_and_an_orphan(tmp_path)
    before = db.read_bytes()
    dry = covshift("clean", "--dry-run", "--db", str(db), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    text = " ".join(dry.stdout.split())
    assert "would mark failed" in text and "would delete" in text and "is finished" in text
    assert "1 stale run and 1 orphan checkpoint (1.0 MB) would be cleaned" in text
    assert orphan.exists() and db.read_bytes() == before
    with Store(db) as store:
        assert [r.status for r in store.runs()] == ["finished", "stale"]
    done = covshift("clean", "--db", str(db), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "marked failed" in done.stdout and not orphan.exists()
    with Store(db) as store:
        stale = store.runs()[1]
        assert stale.status == "failed" and stale.error.startswith("stale: its process")
        assert store.checkpoint_path(stale.id).exists()  # still resumable
    again = covshift("clean", "--db", str(db), cwd=tmp_path)
    assert "nothing to clean" in again.stdout


def test_clean_remove_deletes_the_stale_run(tmp_path: Path) -> None:
    db, _ = _store_with_a_stale_run_and_an_orphan(tmp_path)
    with Store(db) as store:
        stale_id = store.runs()[1].id
        checkpoint = store.checkpoint_path(stale_id)
    proc = covshift("clean", "--remove", "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 0 and "deleted" in proc.stdout
    with Store(db) as store:
        assert [r.name for r in store.runs()] == ["done"]
    assert not checkpoint.exists()
    missing = covshift("clean", "--db", str(tmp_path / "none.db"), cwd=tmp_path)
    assert missing.returncode == 2 and "no store at" in missing.stderr


def test_check_prints_a_config_that_runs_as_the_same_experiment(tmp_path: Path) -> None:
    args = ["ioffe2015", "--size", "quick", "--set", "optimizer.lr=0.25", "--seeds", "2"]
    proc = covshift("check", *args, "--set", "dataset=synthetic", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(proc.stdout)
    expected = load_config(
        "ioffe2015",
        {"optimizer.lr": 0.25, "seeds": 2, "dataset": "synthetic"},
        size="quick",
    )
    assert experiment_id(load_config(str(resolved))) == experiment_id(expected)
    assert f"ok: {experiment_id(expected)}, 4 points" in " ".join(proc.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolved.toml"]  # nothing written
    as_json = covshift("check", *args, "--set", "dataset=synthetic", "--json", cwd=tmp_path)
    assert json.loads(as_json.stdout)["optimizer"]["lr"] == 0.25


def test_check_refuses_what_run_refuses_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\ntitle = "x"\ndataset = "synthetic"\n[model]\nnorm = "batch"\n'
        "[model.norm_kwargs]\nmomentumm = 0.1\n"
    )
    proc = covshift("check", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "momentumm" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_resume_of_a_complete_experiment_says_so(tmp_path: Path) -> None:
    quick = ["--dataset", "synthetic", "--steps", "20", "--eval-every", "10", "--seeds", "1"]
    first = covshift("run", "ioffe2015", *quick, "--set", "model.width=8", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ((experiment, _, _),) = Store(tmp_path / "covshift-out" / "covshift.db").experiments()
    again = covshift("run", "--resume", experiment, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    text = " ".join(again.stdout.split())
    assert f"{experiment} is complete: each of its 2 points is recorded (finished)" in text
