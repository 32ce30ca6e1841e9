"""Checkpoints and faults of batched members are handled as a single point's are: a
member's damaged checkpoint is set aside, recorded and printed, and that member alone
restarts from step 0 (the others resume), all ending with the numbers of an
uninterrupted batched run; a full disk in the middle of a batch closes every member's
run ``interrupted`` with one message, and the next call resumes them."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest
from rich.console import Console

import covshift.checkpoint_files as checkpoint_files
from covshift.experiments import load_config, plan_sweep, run_experiment
from covshift.experiments.backends import InlineBackend
from covshift.experiments.backends.base import SweepContext, claim_and_train
from covshift.experiments.backends.group import claim_and_train_group
from covshift.experiments.members import group_points
from covshift.experiments.sweep import make_sweep_progress
from covshift.store import StorageFault, Store

from .helpers import (
    SMALL_SWEEP,
    InterruptAt,
    SilentProgress,
    dump,
    integrity,
    statuses,
    sweep_file,
)
from .test_damaged_checkpoints import _flip

# 2 networks x 3 seeds, checkpoints every 50 steps: two batches of 3 members.
SWEEP = (
    SMALL_SWEEP.replace("[0.1, 0.5, 2.0]", "[0.5]")
    .replace("steps = 60", "steps = 300")
    .replace("eval_every = 20", "eval_every = 50")
    .replace("every = 20", "every = 50")
)
MEMBERS = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(str(sweep_file(tmp, SWEEP)))
    with Store(tmp / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1), members=MEMBERS)
    return dump(tmp / "ref.db")


def _interrupted_batches(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Both batches trained to step 170 and interrupted, every member with its
    checkpoint of step 150 (which records its batch)."""
    config = load_config(str(sweep_file(tmp_path, SWEEP)))
    db = tmp_path / "c.db"
    plan = plan_sweep(config, db)
    with Store(db) as store:
        context = SweepContext(str(db), plan.experiment_id, config.name)
        for batch in group_points(plan.points, MEMBERS):
            assert len(batch) == MEMBERS
            outcomes = claim_and_train_group(
                store,
                batch,
                context,
                threads=1,
                events=SilentProgress(),
                background=None,
                callbacks=(InterruptAt(170),),
            )
            assert {o.status for o in outcomes} == {"interrupted"}
        paths = [store.checkpoint_path(r.id) for r in store.runs()]
        assert {(r.status, r.last_step) for r in store.runs()} == {("interrupted", 150)}
    assert len(paths) == 2 * MEMBERS and all(p.exists() for p in paths)
    return db, paths


def _resume(db: Path) -> str:
    config = load_config(str(db.parent / "sweep.toml"))
    out = io.StringIO()
    progress = make_sweep_progress(disable=True, console=Console(file=out, width=400))
    with Store(db) as store:
        result = run_experiment(
            config, store, backend=InlineBackend(threads=1), progress=progress, members=MEMBERS
        )
    assert {o.status for o in result.outcomes} == {"finished"}
    return out.getvalue()


def test_an_interrupted_batch_resumes_to_the_uninterrupted_numbers(
    tmp_path: Path, reference: dict
) -> None:
    db, _ = _interrupted_batches(tmp_path)
    _resume(db)
    assert dump(db) == reference
    with Store(db) as store:
        assert store.events() == []


def test_a_members_damaged_checkpoint_restarts_that_member_alone(
    tmp_path: Path, reference: dict
) -> None:
    db, paths = _interrupted_batches(tmp_path)
    damaged = paths[1]  # the second member of the first batch
    _flip(damaged, "middle")
    printed = _resume(db)
    assert dump(db) == reference  # the restarted member and its company alike
    assert integrity(db) == "ok" and {s for _, s in statuses(db)} == {"finished"}
    with Store(db) as store:
        (event,) = store.events()
    assert event.kind == "checkpoint_damaged"
    assert event.message.startswith(f"checkpoint {damaged} failed its digest check")
    assert event.message.endswith("restarts from step 0")
    assert Path(event.path).name.startswith(damaged.name + ".damaged-")
    assert " ".join(printed.split()).count(f"checkpoint {damaged} failed its digest check") == 1


def test_a_full_disk_in_a_batch_closes_every_member_and_the_next_call_resumes(
    tmp_path: Path, reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(str(sweep_file(tmp_path, SWEEP)))
    db = tmp_path / "c.db"
    real_write = checkpoint_files._write_file
    written = [0]

    def write(path: Path, data: bytes) -> None:
        written[0] += 1
        if written[0] >= 9:  # a checkpoint file in the middle of the first batch
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_files, "_write_file", write)
    with Store(db) as store, pytest.raises(StorageFault) as caught:
        run_experiment(config, store, backend=InlineBackend(threads=1), members=MEMBERS)
    said = " ".join(str(caught.value).split())
    assert "cannot write it" in said and "run-2.pt" in said  # the second member's, step 100
    assert said.count("was closed as interrupted") == MEMBERS  # every member of the batch
    assert sorted(s for _, s in statuses(db)) == ["interrupted"] * MEMBERS
    monkeypatch.setattr(checkpoint_files, "_write_file", real_write)
    _resume(db)
    assert dump(db) == reference
    assert integrity(db) == "ok"


def test_a_run_started_one_at_a_time_goes_on_one_at_a_time(tmp_path: Path) -> None:
    """A checkpoint saved by the one-at-a-time loop (``--members 1``) resumed by a
    batched sweep: the run goes on one at a time, ending with the numbers of an
    uninterrupted ``--members 1`` run (the paths differ in the last bits)."""
    config = load_config(str(sweep_file(tmp_path, SWEEP)))
    with Store(tmp_path / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
    db = tmp_path / "c.db"
    plan = plan_sweep(config, db)
    with Store(db) as store:
        context = SweepContext(str(db), plan.experiment_id, config.name)
        first = plan.points[0]
        outcome = claim_and_train(
            store,
            first,
            context,
            threads=1,
            events=SilentProgress(),
            background=None,
            callbacks=(InterruptAt(170),),
        )
        assert outcome.status == "interrupted"
    _resume(db)
    ours, alone = dump(db), dump(tmp_path / "ref.db")
    assert ours[first.id] == alone[first.id]
