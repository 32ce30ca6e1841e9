"""The command line, as a user runs it: subprocesses on synthetic data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covshift.store import Store

QUICK = [
    "--dataset",
    "synthetic",
    "--steps",
    "200",
    "--eval-every",
    "100",
    "--probe-every",
    "50",
    "--set",
    "model.width=16",
]


def covshift(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "covshift.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_run_json(tmp_path: Path) -> None:
    proc = covshift("run", "ioffe2015", *QUICK, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout is pure JSON; progress went to stderr
    assert set(summary["networks"]) == {"baseline", "batchnorm"}
    for net in summary["networks"].values():
        assert net["final_step"] == 200 and 0 <= net["test_accuracy"]["final"] <= 1
        assert set(net["drift"]) == {"hidden.0.act", "hidden.1.act", "hidden.2.act"}
    report = Path(summary["report"])
    assert not report.is_absolute() or report.exists()
    assert (tmp_path / report).exists() and (tmp_path / report).parent.joinpath(
        "figure.svg"
    ).exists()
    assert (tmp_path / "covshift-out" / "covshift.db").exists()


def test_run_table_then_runs_and_report(tmp_path: Path) -> None:
    proc = covshift("run", "ioffe2015", *QUICK, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "headline numbers" in proc.stdout
        and "drift hidden.2.act" in proc.stdout
        and "Report:" in proc.stdout
    )
    runs = covshift("runs", cwd=tmp_path)
    assert runs.returncode == 0
    assert "baseline" in runs.stdout and "batchnorm" in runs.stdout and "finished" in runs.stdout
    experiment = Store(tmp_path / "covshift-out" / "covshift.db").runs()[0].experiment
    rebuilt = covshift("report", experiment, "--out", "again", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "again" / "index.html").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope"], "unknown preset 'nope'"),
        (["run", "ioffe2015", "--lr", "-1"], "optimizer.lr: Input should be greater than 0"),
        (["run", "ioffe2015", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (
            ["run", "ioffe2015", "--dataset", "mnist", "--data-dir", "nowhere"],
            "train-images-idx3-ubyte(.gz) not found in nowhere",
        ),
        (["run", "ioffe2015", "--set", "lr"], "--set expects KEY=VALUE"),
        (["run", "ioffe2015", "--steps", "0"], "Invalid value for '--steps'"),
        (["run", "ioffe2015", "--bogus"], "No such option: --bogus"),
        (["runs", "--db", "none.db"], "no store at none.db"),
        (["run", "ioffe2015", "--device", "tpu"], "device must be 'auto', 'cpu' or 'cuda"),
    ],
)
def test_bad_input_gets_a_message_not_a_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = covshift(*args, cwd=tmp_path)
    assert proc.returncode == 2
    text = " ".join((proc.stderr + proc.stdout).split())
    assert message in text
    assert "Traceback" not in text


def test_help_lists_commands_with_examples(tmp_path: Path) -> None:
    top = covshift("--help", cwd=tmp_path)
    assert top.returncode == 0
    for command in ("run", "runs", "presets", "report"):
        assert command in top.stdout
    for command in ("run", "runs", "presets", "report"):
        sub = covshift(command, "--help", cwd=tmp_path)
        assert sub.returncode == 0 and "Example" in sub.stdout


def test_ctrl_c_marks_the_run_interrupted_and_resume_finishes_it(tmp_path: Path) -> None:
    args = [
        "run",
        "ioffe2015",
        "--dataset",
        "synthetic",
        "--steps",
        "5000",
        "--eval-every",
        "100",
        "--set",
        "model.width=16",
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "covshift.cli", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = tmp_path / "covshift-out" / "covshift.db"
    deadline = time.time() + 120
    while time.time() < deadline:
        if db.exists():
            runs = Store(db).runs()
            if runs and runs[0].last_step >= 300:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "--resume" in err
    (run,) = Store(db).runs()
    assert run.status == "interrupted" and run.last_step >= 300
    steps, _ = Store(db).scalars(run.id, "test_accuracy")
    assert steps[-1] == run.last_step
    # resuming with overrides is refused: the recorded settings are used
    refused = covshift("run", "ioffe2015", "--resume", run.experiment, "--steps", "5", cwd=tmp_path)
    assert refused.returncode == 2 and "drop the overrides" in refused.stderr
    checkpoint = tmp_path / "covshift-out" / "checkpoints" / f"run-{run.id}.pt"
    assert checkpoint.exists()
    resumed = covshift("run", "ioffe2015", "--resume", run.experiment, "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    runs = Store(db).runs()
    assert [r.status for r in runs] == ["finished", "finished"]
    assert [r.last_step for r in runs] == [5000, 5000] and runs[-1].id == run.id
    assert not checkpoint.exists()
