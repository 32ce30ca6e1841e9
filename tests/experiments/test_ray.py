"""The Ray backend, against a local Ray instance: the same numbers as the local
backend, bitwise, and a crashed task resumed from the checkpoint the driver holds."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from covshift.experiments import load_config, run_experiment
from covshift.experiments.backends import InlineBackend
from covshift.experiments.backends.ray_backend import RayBackend
from covshift.store import Store

from .helpers import SMALL_SWEEP, covshift, dump, integrity, statuses, sweep_file

pytest.importorskip("ray", reason="the ray extra: pip install 'covshift[ray]'")


def test_ray_backend_gives_the_local_numbers_bitwise(tmp_path: Path) -> None:
    path = sweep_file(tmp_path)
    local = covshift("run", str(path), "--workers", "2", "--db", "local.db", "--json", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    ray = covshift("run", str(path), "--backend", "ray", "--db", "ray.db", "--json", cwd=tmp_path)
    assert ray.returncode == 0, ray.stderr
    assert "ray backend, Ray tasks of 1 CPU" in ray.stderr
    assert len(statuses(tmp_path / "ray.db")) == 18
    assert {s for _, s in statuses(tmp_path / "ray.db")} == {"finished"}
    assert dump(tmp_path / "ray.db") == dump(tmp_path / "local.db")
    assert integrity(tmp_path / "ray.db") == "ok"
    a, b = json.loads(local.stdout), json.loads(ray.stdout)
    assert a["claims"] == b["claims"]

    def numbers(cells: list[dict]) -> list[dict]:  # run ids differ between two stores
        return [{k: v for k, v in c.items() if k != "run_ids"} for c in cells]

    assert numbers(a["cells"]) == numbers(b["cells"])
    # No checkpoint is left once every point is finished.
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def test_a_crashed_ray_task_resumes_from_the_drivers_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = SMALL_SWEEP.replace("steps = 60", "steps = 200").replace("seeds = 3", "seeds = 1")
    config = load_config(str(sweep_file(tmp_path, text)))
    with Store(tmp_path / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1))

    real_apply = RayBackend._apply
    seen: dict[str, list] = {"killed": [], "steps": []}

    def apply_then_crash_once(store, job, item, events):
        if seen["killed"] and job.point.id == seen["killed"][0]:
            seen["steps"] += [r[1] for r in item.get("rows", []) if r[0] == "scalars"]
        out = real_apply(store, job, item, events)
        if item["kind"] == "chunk" and job.step >= 100 and not seen["killed"]:
            os.kill(job.pid, signal.SIGKILL)  # the process of the task that sent it
            seen["killed"].append(job.point.id)
        return out

    monkeypatch.setattr(RayBackend, "_apply", staticmethod(apply_then_crash_once))
    backend = RayBackend(threads=1)
    with Store(tmp_path / "c.db") as store:
        result = run_experiment(config, store, backend=backend)
    assert seen["killed"], "no task was killed"
    # The second attempt started from the checkpoint of step 100, not from step 0.
    assert seen["steps"] and min(seen["steps"]) > 100
    assert {o.status for o in result.outcomes} == {"finished"}
    assert len(statuses(tmp_path / "c.db")) == 6
    assert dump(tmp_path / "c.db") == dump(tmp_path / "ref.db")


def test_a_damaged_driver_checkpoint_restarts_the_ray_point_from_step_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task crashes; before it is resubmitted, bytes change inside a tensor of the
    checkpoint the driver holds: the driver does not send it, keeps it aside, records
    and prints it, and the point trains again from step 0 to the local numbers."""
    from .test_damaged_checkpoints import _flip

    # Long enough that the task is still training when the driver reads its step 100.
    text = SMALL_SWEEP.replace("steps = 60", "steps = 1000").replace("seeds = 3", "seeds = 1")
    text = text.replace("[0.1, 0.5, 2.0]", "[0.5]")
    config = load_config(str(sweep_file(tmp_path, text)))
    with Store(tmp_path / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1))

    import covshift.experiments.backends.ray_backend as ray_backend

    real_apply, real_read = RayBackend._apply, ray_backend.read_checkpoint
    seen: dict[str, list] = {"killed": [], "steps": [], "damaged": []}

    def apply_then_crash(store, job, item, events):
        if seen["killed"] and job.point.id == seen["killed"][0]:
            seen["steps"] += [r[1] for r in item.get("rows", []) if r[0] == "scalars"]
        out = real_apply(store, job, item, events)
        if item["kind"] == "chunk" and job.step >= 100 and not seen["killed"]:
            os.kill(job.pid, signal.SIGKILL)
            seen["killed"].append(job.point.id)
        return out

    def damaged_before_resubmission(path: Path):
        if seen["killed"] and not seen["damaged"] and path.exists():
            _flip(path, "middle")  # what the driver holds changed on its disk
            seen["damaged"].append(path)
        return real_read(path)

    monkeypatch.setattr(RayBackend, "_apply", staticmethod(apply_then_crash))
    monkeypatch.setattr(ray_backend, "read_checkpoint", damaged_before_resubmission)
    with Store(tmp_path / "c.db") as store:
        result = run_experiment(config, store, backend=RayBackend(threads=1))
        events = store.events()
    assert seen["killed"] and seen["damaged"], seen
    assert min(seen["steps"]) == 0  # not resumed from the damaged state
    assert {o.status for o in result.outcomes} == {"finished"}
    assert dump(tmp_path / "c.db") == dump(tmp_path / "ref.db")
    (event,) = events
    assert event.kind == "checkpoint_damaged" and "failed its digest check" in event.message
    assert Path(event.path).exists() and ".damaged-" in event.path
    assert integrity(tmp_path / "c.db") == "ok"


def test_ray_missing_cluster_is_a_clear_error(tmp_path: Path) -> None:
    proc = covshift(
        "run",
        str(sweep_file(tmp_path)),
        "--backend",
        "ray",
        "--address",
        "127.0.0.1:1",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot start or join the Ray cluster at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr
