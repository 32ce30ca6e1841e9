"""Nothing lost, nothing repeated: a sweep's driver killed with SIGKILL at random
moments, then run again, ends with every point recorded exactly once, series without
duplicate steps, the numbers of an uninterrupted run, and a sound database."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covshift.experiments import load_config, run_experiment
from covshift.experiments.backends import InlineBackend
from covshift.store import Store, pid_alive

from .helpers import SMALL_SWEEP, dump, integrity, sweep_file

pytestmark = pytest.mark.slow

KILL_SWEEP = (
    SMALL_SWEEP.replace("[0.1, 0.5, 2.0]", "[0.1, 0.5]")
    .replace("seeds = 3", "seeds = 2")
    .replace("steps = 60", "steps = 1500")
    .replace("eval_every = 20", "eval_every = 100")
    .replace("every = 20", "every = 50")
)


def _live_workers(db: Path, driver: int) -> list[int]:
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    pids = [r[0] for r in con.execute("SELECT pid FROM runs WHERE status = 'running'")]
    con.close()
    return [p for p in pids if p and p != driver and pid_alive(p)]


def _wait_for_training(db: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the driver has a point in training (a run row marked running), or ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # read-only: never create the store the driver is about to make
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
            try:
                running = con.execute("SELECT 1 FROM runs WHERE status = 'running'").fetchone()
            finally:
                con.close()
            if running:
                return
        except sqlite3.Error:  # no store or no table yet
            pass
        time.sleep(0.05)


@pytest.mark.parametrize("members", [None, 4])  # the planner's batches; batches of 4
def test_sigkill_of_the_driver_at_random_moments_loses_and_repeats_nothing(
    tmp_path: Path, members: int | None
) -> None:
    path = sweep_file(tmp_path, KILL_SWEEP)
    config = load_config(str(path))
    started = time.perf_counter()
    with Store(tmp_path / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1), members=members)
    # Kills land at random moments of the training itself, scaled to how long it takes
    # here (delays fixed in seconds let a fast machine finish before the second kill).
    training = time.perf_counter() - started
    reference = dump(tmp_path / "ref.db")
    db = tmp_path / "c.db"
    command = [
        sys.executable,
        "-m",
        "covshift.cli",
        "run",
        str(path),
        "--db",
        str(db),
        "--workers",
        "2",
        "--threads",
        "1",
        "--quiet",
        *(["--members", str(members)] if members else []),
    ]
    rng = random.Random(20261201)
    kills = 0
    for _ in range(5):
        proc = subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait_for_training(db, proc)
        time.sleep(rng.uniform(0.02, 0.25) * training)
        if proc.poll() is not None:
            break  # the sweep finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        kills += 1
        # The workers die with their driver (PR_SET_PDEATHSIG): no orphan writes on.
        deadline = time.monotonic() + 10
        while _live_workers(db, proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _live_workers(db, proc.pid) == []
        assert integrity(db) == "ok" if db.exists() else True
    assert kills >= 2, "the sweep finished too fast to be killed"
    final = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr

    con = sqlite3.connect(db)
    rows = con.execute("SELECT point, status FROM runs").fetchall()
    assert len(rows) == len({p for p, _ in rows}) == 8  # each point exactly once
    assert {s for _, s in rows} == {"finished"}
    dupes = con.execute(
        "SELECT run_id, name, step, COUNT(*) FROM scalars GROUP BY run_id, name, step"
        " HAVING COUNT(*) > 1"
    ).fetchall()
    assert dupes == []
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert dump(db) == reference  # resumed points end with the uninterrupted numbers
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # all cleaned up
