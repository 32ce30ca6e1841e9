"""scripts/battery_time.py: a battery's training time from its store, pauses left out."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from covshift.experiments import load_config, run_experiment
from covshift.experiments.backends import InlineBackend
from covshift.store import Store

from .helpers import SMALL_SWEEP, load_script, sweep_file

battery_time = load_script("battery_time")
MIN = 60.0


def test_a_pause_inside_a_resumed_runs_span_is_not_counted() -> None:
    # Session 1: 0-30 min, two workers, points of 10 min; one point interrupted at 30
    # and resumed at 210 (a 3-hour pause), ending at 215; session 2 goes on to 240.
    spans = [
        (0 * MIN, 10 * MIN), (0 * MIN, 12 * MIN), (10 * MIN, 20 * MIN), (12 * MIN, 22 * MIN),
        (20 * MIN, 215 * MIN),  # interrupted at 30, resumed at 210
        (22 * MIN, 30 * MIN),  # the other worker, stopped with the session... finished
        (210 * MIN, 225 * MIN), (215 * MIN, 240 * MIN), (225 * MIN, 240 * MIN),
    ]  # fmt: skip
    found = battery_time.busy_time(spans, gap=20 * MIN)
    assert found.union == 240 * MIN
    assert found.gaps == [(30 * MIN, 210 * MIN)]
    assert found.seconds == (30 + 30) * MIN  # the two sessions, not the pause
    assert found.longest_run == 25 * MIN  # (215, 240): the resumed run holds the gap
    assert found.runs == 9 and found.open_runs == 0


def test_gaps_between_runs_are_not_subtracted_twice_and_open_runs_are_counted() -> None:
    spans = [(0.0, 10 * MIN), (100 * MIN, 110 * MIN), None]
    found = battery_time.busy_time(spans, gap=20 * MIN)
    assert found.union == 20 * MIN and found.gaps == [] and found.seconds == 20 * MIN
    assert found.open_runs == 1 and found.runs == 2
    # A gap shorter than --gap is training, not a pause.
    busy = battery_time.busy_time([(0.0, 50 * MIN), (5 * MIN, 20 * MIN)], gap=40 * MIN)
    assert busy.seconds == 50 * MIN and busy.gaps == []


def test_the_table_of_a_recorded_experiment(tmp_path: Path, capsys) -> None:
    config = load_config(str(sweep_file(tmp_path, SMALL_SWEEP.replace("seeds = 3", "seeds = 1"))))
    with Store(tmp_path / "c.db") as store:
        result = run_experiment(config, store, backend=InlineBackend(threads=1))
        runs = store.runs_of_points(
            [p.point for p in store.experiment_points(result.experiment_id)]
        )
    page = tmp_path / "claims.json"
    page.write_text(
        json.dumps({"presets": [{"preset": "small", "experiment": result.experiment_id}]})
    )
    assert battery_time.main([str(tmp_path / "c.db"), "--claims", str(page)]) == 0
    rows = capsys.readouterr().out.splitlines()
    small = next(r for r in rows if r.startswith("| `small`"))
    cells = [c.strip() for c in small.strip("|").split("|")]
    assert cells[1] == str(len(runs)) == "6" and cells[2] == "0"
    assert cells[5] == "0"  # no pause in a run of seconds
    assert cells[3] == cells[4]  # busy = union: nothing paused
    with sqlite3.connect(tmp_path / "c.db") as con:
        spans = battery_time.experiment_spans(con, result.experiment_id)
    assert len(spans) == 6 and all(s is not None and s[0] <= s[1] for s in spans)
    found = battery_time.busy_time(spans, gap=20 * MIN)
    assert found.seconds == found.union >= 0 and found.union <= max(s[1] for s in spans) - min(
        s[0] for s in spans
    )


def test_bad_input_names_the_file_or_the_argument(tmp_path: Path) -> None:
    bad = tmp_path / "claims.json"
    bad.write_text("{}")
    store = tmp_path / "c.db"
    Store(store).close()
    with pytest.raises(SystemExit, match=r"claims.json: not a battery page's claims.json"):
        battery_time.main([str(store), "--claims", str(bad)])
    with pytest.raises(SystemExit, match=r"no such store"):
        battery_time.main([str(tmp_path / "none.db"), "--experiment", "x"])
    with pytest.raises(SystemExit, match=r"no runs of experiment 'x'"):
        battery_time.main([str(store), "--experiment", "x"])
    with pytest.raises(SystemExit, match=r"--gap must be a positive number"):
        battery_time.main([str(store), "--experiment", "x", "--gap", "0"])
