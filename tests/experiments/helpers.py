"""Helpers of the sweep tests: a small synthetic sweep, a CLI runner, store dumps."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

# 3 learning rates x 2 networks x 3 seeds = 18 points, each a few seconds at most.
SMALL_SWEEP = """
name = "small-sweep"
title = "lr x norm x seed on synthetic data"
dataset = "synthetic"
seeds = 3
steps = 60
batch_size = 30
eval_every = 20
[model]
width = 16
[probe]
every = 20
examples = 100
[sweep]
optimizer.lr = [0.1, 0.5, 2.0]
[networks.plain]
label = "plain"
norm = "none"
[networks.bn]
label = "BN"
norm = "batch"
[[claims]]
text = "BN is more accurate at the end"
metric = "test_accuracy/final"
network = "bn"
baseline = "plain"
rule = "greater"
"""


def sweep_file(tmp_path: Path, text: str = SMALL_SWEEP, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def covshift(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "covshift.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dump(db: Path) -> dict[str, tuple[list, list]]:
    """Per point: every scalar row and every probe row (bytes), ordered."""
    con = sqlite3.connect(db)
    out: dict[str, tuple[list, list]] = {}
    for run_id, point in con.execute("SELECT id, point FROM runs WHERE point IS NOT NULL"):
        scalars = con.execute(
            "SELECT name, step, value FROM scalars WHERE run_id = ? ORDER BY name, step",
            (run_id,),
        ).fetchall()
        probes = con.execute(
            "SELECT layer, stat, step, dtype, shape, data FROM probe_records WHERE run_id = ?"
            " ORDER BY layer, stat, step",
            (run_id,),
        ).fetchall()
        out[point] = (scalars, probes)
    con.close()
    return out


def statuses(db: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT point, status FROM runs ORDER BY point").fetchall()
    con.close()
    return rows


def integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    result = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    return result


class InterruptAt170:
    """A training callback that presses Ctrl-C at step 170."""

    def on_step_end(self, state: object) -> None:
        if state.step == 170:  # type: ignore[attr-defined]
            raise KeyboardInterrupt


class SilentProgress:
    """A backend's progress that shows nothing and fails on any note (none is due)."""

    def started(self, point_id: str, run_id: int, step: int) -> None:
        pass

    def advanced(self, point_id: str, step: int) -> None:
        pass

    def ended(self, outcome: object) -> None:
        pass

    def note(self, point_id: str, text: str) -> None:
        raise AssertionError(f"nothing to say yet: {text}")
