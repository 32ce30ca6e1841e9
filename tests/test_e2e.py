"""End-to-end: the README's main job, shortened, on real Fashion-MNIST (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from covshift.data import DEFAULT_FASHION_MNIST_DIR

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (scripts/install.sh installs it as root)",
)
def test_ioffe2015_2000_steps_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "covshift.cli", "run", "ioffe2015", "--steps", "2000", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["dataset"] == "fashion-mnist" and summary["steps"] == 2000
    assert summary["seeds"] == [0, 1, 2]
    base, bn = summary["networks"]["baseline"], summary["networks"]["batchnorm"]
    for net in (base, bn):
        assert net["status"] == {"finished": 3} and net["final_step"] == 2000
        # eval-mode records, and train-mode ones (probe.mode = "both")
        layers = {"hidden.0.act", "hidden.1.act", "hidden.2.act"}
        assert set(net["drift"]) == layers | {f"{x}@train" for x in layers}
    # Fashion-MNIST after 1,000 steps of this setup, mean of 3 seeds: both nets well
    # above chance, BN ahead (measured 0.82 vs 0.76 with seed 0).
    assert 0.65 < base["test_accuracy"]["1000"] < 0.85
    assert 0.75 < bn["test_accuracy"]["1000"] < 0.9
    early = next(c for c in summary["claims"] if c["id"] == "early-accuracy")
    assert early["seeds"] == 3 and early["interval"] is not None
    assert early["verdict"] == "supported"  # +6 points, seed noise about 0.6
    report = tmp_path / summary["report"]
    assert report.exists() and (report.parent / "figure.png").exists()
    assert (report.parent / "claims.html").exists()
