"""Helpers of the sweep tests: a small synthetic sweep, a CLI runner, store dumps,
Ctrl-C at a given step, and the repository's scripts as modules."""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

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


class InterruptAt:
    """A training callback that presses Ctrl-C at step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state: object) -> None:
        if state.step == self.at:  # type: ignore[attr-defined]
            raise KeyboardInterrupt


def interrupt_nth_point(monkeypatch: pytest.MonkeyPatch, n: int, at: int) -> Callable[[], None]:
    """Makes the ``n``-th point trained one at a time (``--members 1``) stop with
    Ctrl-C at step ``at``; returns what undoes it."""
    import covshift.experiments.backends.base as base

    real = base.train_point
    calls = {"n": 0}

    def interrupted_in_the_nth_point(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            kwargs["callbacks"] = (*kwargs["callbacks"], InterruptAt(at))
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "train_point", interrupted_in_the_nth_point)
    return lambda: monkeypatch.setattr(base, "train_point", real)


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up while defined
    spec.loader.exec_module(module)
    return module


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
