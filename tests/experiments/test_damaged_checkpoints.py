"""A checkpoint damaged between an interruption and its resumption (bytes flipped
inside its tensors, so that it still unpickles; or no digest, as an older covshift
wrote it) is never resumed from: the point restarts from step 0 and ends with the
numbers of an uninterrupted run, the file is kept aside, the event is recorded in the
store and printed once with the file's path."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
from rich.console import Console

from covshift.checkpoint_files import digest_file
from covshift.experiments import load_config, plan_sweep, run_experiment
from covshift.experiments.backends import InlineBackend, PoolBackend
from covshift.experiments.backends.base import SweepContext
from covshift.experiments.backends.group import claim_and_train_group
from covshift.experiments.sweep import make_sweep_progress
from covshift.store import Store

from .helpers import (
    SMALL_SWEEP,
    InterruptAt,
    SilentProgress,
    covshift,
    dump,
    integrity,
    statuses,
    sweep_file,
)

# 2 networks x 1 seed, checkpoints every 50 steps; interrupted at step 170.
SWEEP = (
    SMALL_SWEEP.replace("[0.1, 0.5, 2.0]", "[0.5]")
    .replace("seeds = 3", "seeds = 1")
    .replace("steps = 60", "steps = 300")
    .replace("eval_every = 20", "eval_every = 50")
    .replace("every = 20", "every = 50")
)


def tensor_spans(path: Path) -> list[tuple[int, int]]:
    """``(offset, size)`` in the file of every tensor's bytes (torch's zip format stores
    each tensor uncompressed as ``<archive>/data/<key>``), largest first."""
    raw = path.read_bytes()
    spans = []
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        for info in archive.infolist():
            if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                continue
            name_len, extra_len = struct.unpack(
                "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
            )
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((start, info.file_size))
    return sorted(spans, key=lambda s: -s[1])


def _flip(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    start, size = tensor_spans(path)[0]  # a weight matrix
    offset = {"first": start, "middle": start + size // 2, "last": start + size - 1}[where]
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(str(sweep_file(tmp, SWEEP)))
    with Store(tmp / "ref.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1))
    return dump(tmp / "ref.db")


def _interrupted_sweep(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Every point of the sweep trained to step 170 and interrupted (as Ctrl-C does),
    each with its checkpoint of step 150."""
    config = load_config(str(sweep_file(tmp_path, SWEEP)))
    db = tmp_path / "c.db"
    plan = plan_sweep(config, db)
    with Store(db) as store:
        context = SweepContext(str(db), plan.experiment_id, config.name)
        for point in plan.points:  # as a sweep trains it (a batch of one batched model)
            (outcome,) = claim_and_train_group(
                store,
                [point],
                context,
                threads=1,
                events=SilentProgress(),
                background=None,
                callbacks=(InterruptAt(170),),
            )
            assert outcome.status == "interrupted"
        paths = [store.checkpoint_path(r.id) for r in store.runs()]
        assert {(r.status, r.last_step) for r in store.runs()} == {("interrupted", 150)}
    assert len(paths) == 2 and all(p.exists() and digest_file(p).exists() for p in paths)
    return db, paths


def _resume(db: Path, backend: object) -> str:
    config = load_config(str(db.parent / "sweep.toml"))
    out = io.StringIO()
    progress = make_sweep_progress(disable=True, console=Console(file=out, width=400))
    with Store(db) as store:
        result = run_experiment(config, store, backend=backend, progress=progress)  # type: ignore[arg-type]
    assert {o.status for o in result.outcomes} == {"finished"}
    return out.getvalue()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_bytes_in_a_tensor_restart_the_point_from_step_0(
    tmp_path: Path, reference: dict, where: str
) -> None:
    db, paths = _interrupted_sweep(tmp_path)
    for path in paths:
        _flip(path, where)
    damaged = {p: p.read_bytes() for p in paths}
    printed = _resume(db, InlineBackend(threads=1))
    assert dump(db) == reference  # the numbers of the uninterrupted run
    assert integrity(db) == "ok" and {s for _, s in statuses(db)} == {"finished"}
    with Store(db) as store:
        events = store.events()
    assert len(events) == 2 and {e.kind for e in events} == {"checkpoint_damaged"}
    for path in paths:
        (event,) = [e for e in events if e.message.startswith(f"checkpoint {path} ")]
        assert "failed its digest check" in event.message
        assert event.message.endswith("restarts from step 0")
        kept = Path(event.path)
        assert kept.name.startswith(path.name + ".damaged-") and kept.read_bytes() == damaged[path]
        assert printed.count(f"checkpoint {path} failed its digest check") == 1  # once
        assert not path.exists()  # the run finished: its own checkpoint is gone


def test_a_checkpoint_without_a_digest_is_not_resumed_from(tmp_path: Path, reference: dict) -> None:
    db, paths = _interrupted_sweep(tmp_path)
    for path in paths:
        digest_file(path).unlink()  # as covshift wrote checkpoints before they had one
    printed = _resume(db, InlineBackend(threads=1))
    assert dump(db) == reference
    with Store(db) as store:
        assert {e.kind for e in store.events()} == {"checkpoint_unverified"}
    assert printed.count("has no digest file") == 2
    assert len(list((tmp_path / "checkpoints").glob("*.pt.unverified-*"))) == 2


@pytest.mark.slow
def test_pool_workers_restart_a_damaged_point_and_the_driver_prints_it(
    tmp_path: Path, reference: dict
) -> None:
    db, paths = _interrupted_sweep(tmp_path)
    _flip(paths[0], "middle")
    printed = _resume(db, PoolBackend(2, 1))
    assert dump(db) == reference
    assert printed.count(f"checkpoint {paths[0]} failed its digest check") == 1
    with Store(db) as store:
        assert [e.kind for e in store.events()] == ["checkpoint_damaged"]


@pytest.mark.slow
def test_the_command_line_says_it_once_and_runs_and_clean_list_it(
    tmp_path: Path, reference: dict
) -> None:
    db, paths = _interrupted_sweep(tmp_path)
    _flip(paths[1], "middle")
    proc = covshift("run", "sweep.toml", "--db", str(db), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())
    assert said.count(f"checkpoint {paths[1]} failed its digest check") == 1
    assert "Traceback" not in proc.stderr
    assert dump(db) == reference
    runs = covshift("runs", "--db", str(db), cwd=tmp_path)
    assert f"checkpoint {paths[1]} failed its digest check" in " ".join(runs.stdout.split())
    clean = covshift("clean", "--db", str(db), cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert (
        "0 stale runs and 0 orphan checkpoints (0.0 MB) were cleaned; 2 checkpoint files set "
        f"aside as damaged or unverified are kept in {tmp_path / 'checkpoints'}"
    ) in clean.stdout
    assert len(list((tmp_path / "checkpoints").glob("*.damaged-*"))) == 2  # file and digest
