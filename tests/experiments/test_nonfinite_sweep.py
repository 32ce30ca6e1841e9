"""A point that diverges to inf and NaN: its records count the non-finite units, its
numbers are reported as not measured (never a finite number made of inf), and no
numpy warning reaches the terminal, whichever backend runs it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .helpers import SMALL_SWEEP, sweep_file

# lr 1e30 without a stop: the plain network's activations overflow to inf, then NaN.
EXPLODING = (
    SMALL_SWEEP.replace("[0.1, 0.5, 2.0]", "[1e10, 1e30]")
    .replace("seeds = 3", "seeds = 1")
    .replace("steps = 60", "steps = 100")
    .replace("every = 20\nexamples", 'every = 10\nmode = "both"\nexamples')
    + "[divergence]\nstop = false\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_diverging_sweep_counts_non_finite_units_and_prints_no_warning(
    tmp_path: Path, workers: str
) -> None:
    path = sweep_file(tmp_path, EXPLODING)
    env = {**os.environ, "PYTHONWARNINGS": "always"}  # any warning would be printed
    proc = subprocess.run(
        [sys.executable, "-m", "covshift.cli", "run", str(path), "--workers", workers, "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout)
    db = sqlite3.connect(tmp_path / "covshift-out" / "covshift.db")
    rows = db.execute(
        "SELECT r.config, p.layer, p.step, p.data FROM probe_records p JOIN runs r"
        " ON r.id = p.run_id WHERE p.stat = 'nonfinite_units'"
    ).fetchall()
    counts = {}
    for config, layer, step, data in rows:
        network = json.loads(config)["network"]
        lr = json.loads(config)["axes"]["optimizer.lr"]
        counts[(network, lr, layer, step)] = int(np.frombuffer(data, dtype=np.int64)[0])
    assert counts and all(0 <= c <= 16 for c in counts.values())  # 16 units a layer
    broken = {k for k, c in counts.items() if c > 0}
    assert broken, "the sweep did not make any non-finite value"
    # Where a record has a non-finite unit, that unit's statistics are NaN.
    for network, lr, layer, step in sorted(broken)[:5]:
        (mean,) = db.execute(
            "SELECT p.data FROM probe_records p JOIN runs r ON r.id = p.run_id"
            " WHERE p.stat = 'mean' AND p.layer = ? AND p.step = ?"
            " AND json_extract(r.config, '$.network') = ?"
            " AND json_extract(r.config, '$.axes.\"optimizer.lr\"') = ?",
            (layer, step, network, lr),
        ).fetchone()
        values = np.frombuffer(mean, dtype=np.float32)
        assert np.isnan(values).sum() == counts[(network, lr, layer, step)]
    db.close()
    # A layer with a non-finite unit in its last record has no drift (null), not a number.
    last = {}
    for network, lr, layer, step in counts:
        last[(network, lr, layer)] = max(step, last.get((network, lr, layer), step))
    checked = 0
    for point in summary["points"]:
        lr = point["axes"]["optimizer.lr"]
        for layer, value in point["drift"].items():
            step = last.get((point["network"], lr, layer))
            if counts.get((point["network"], lr, layer, step), 0) > 0:
                assert value is None, (point["network"], lr, layer, value)
                checked += 1
    assert checked
