"""Checkpoints carry their own proof: a digest written with every save, checked before
any byte is loaded; a file that fails it (a byte changed anywhere, cut short, no
digest, an unreadable digest file) is never loaded, but kept aside; a kill at any
moment of a save leaves a file the digest vouches for; a full disk says which file."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from covshift.checkpoint_files import (
    Rejected,
    checkpoint_digest,
    digest_file,
    read_checkpoint,
    remove_checkpoint,
    set_aside,
    write_checkpoint,
)
from covshift.checkpoints import BytesCheckpointer, CheckpointWarning, FileCheckpointer
from covshift.data import Dataset
from covshift.models import build_mlp
from covshift.store import StorageFault
from covshift.training import TrainConfig, train

DATA = os.urandom(5000)


def test_a_saved_checkpoint_reads_back_with_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "c" / "run.pt"
    digest = write_checkpoint(path, DATA, previous=None)
    assert digest == checkpoint_digest(DATA)
    assert json.loads(digest_file(path).read_text()) == {
        "sha256": digest,
        "bytes": len(DATA),
        "previous": None,
    }
    assert read_checkpoint(path) == (DATA, digest)
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.pt", "run.pt.sha256"]
    assert read_checkpoint(tmp_path / "none.pt") is None


@pytest.mark.parametrize("offset", [0, 1, 100, 2500, 4999])
def test_one_changed_byte_anywhere_is_caught(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "run.pt"
    write_checkpoint(path, DATA, previous=None)
    damaged = bytearray(DATA)
    damaged[offset] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(Rejected, match="failed its digest check: it does not hold") as caught:
        read_checkpoint(path)
    assert caught.value.kind == "checkpoint_damaged"


def test_a_file_cut_short_or_without_a_digest(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    write_checkpoint(path, DATA, previous=None)
    path.write_bytes(DATA[:1234])
    with pytest.raises(Rejected, match="is 1234 bytes long, but 5000 were saved"):
        read_checkpoint(path)
    digest_file(path).write_text("{not json")
    with pytest.raises(Rejected, match=r"digest file run\.pt\.sha256 that cannot be read"):
        read_checkpoint(path)
    digest_file(path).unlink()
    with pytest.raises(Rejected, match="has no digest file") as caught:
        read_checkpoint(path)
    assert caught.value.kind == "checkpoint_unverified"


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4])
def test_a_save_killed_at_any_moment_leaves_a_vouched_for_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed_at: int
) -> None:
    """The save's steps: the bytes (1), the digest file (2), its rename (3), the
    checkpoint's rename (4); a kill before each leaves the old file or the new one,
    and the digest file vouches for whichever is there."""
    import covshift.checkpoint_files as files

    path = tmp_path / "run.pt"
    old = write_checkpoint(path, b"old state", previous=None)
    steps = {"n": 0}
    write_file, replace = files._write_file, os.replace

    def step() -> None:
        steps["n"] += 1
        if steps["n"] == killed_at:
            raise KeyboardInterrupt

    def counted_write(p: Path, data: bytes) -> None:
        step()
        write_file(p, data)

    def counted_replace(a: object, b: object) -> None:
        step()
        replace(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "_write_file", counted_write)
    monkeypatch.setattr(files.os, "replace", counted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(path, b"new state", previous=old)
    monkeypatch.undo()
    data, digest = read_checkpoint(path)  # type: ignore[misc]
    assert (data, digest) == (b"old state", old)


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import covshift.checkpoint_files as files

    path = tmp_path / "run.pt"
    old = write_checkpoint(path, b"old state", previous=None)

    def full(p: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(files, "_write_file", full)
    with pytest.raises(StorageFault) as caught:
        write_checkpoint(path, b"new state", previous=old)
    text = str(caught.value)
    assert text.startswith(f"{path}: cannot write it: no space is left on the device")
    assert "run.pt.tmp" in text and "free some space" in text
    monkeypatch.undo()
    assert read_checkpoint(path) == (b"old state", old)
    assert not path.with_name("run.pt.tmp").exists()


def test_set_aside_keeps_both_files_under_a_new_name(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    write_checkpoint(path, DATA, previous=None)
    path.write_bytes(b"x" + DATA[1:])
    with pytest.raises(Rejected) as caught:
        read_checkpoint(path)
    rejection = set_aside(path, caught.value)
    kept = rejection.kept_as
    assert kept is not None and kept.name.startswith("run.pt.damaged-")
    assert kept.read_bytes() == b"x" + DATA[1:] and digest_file(kept).exists()
    assert not path.exists() and not digest_file(path).exists()
    assert read_checkpoint(path) is None
    assert rejection.message.startswith(f"checkpoint {path} failed its digest check")
    assert rejection.message.endswith(f"kept aside as {kept}")
    remove_checkpoint(path)  # nothing there: nothing to do
    assert kept.exists()


# -- in training -----------------------------------------------------------------------

CONFIG = TrainConfig(steps=30, batch_size=20, lr=0.3, momentum=0.9, eval_every=10, seed=4)


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: object) -> None:
        if state.step == self.step:  # type: ignore[attr-defined]
            raise KeyboardInterrupt


def _net() -> torch.nn.Module:
    return build_mlp(784, 10, width=12, norm="batch", seed=0)


def _interrupted(small_data: Dataset, path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(_net(), small_data, CONFIG, device="cpu", checkpoint=path, callbacks=[_StopAt(25)])


def test_a_damaged_file_is_never_resumed_from(small_data: Dataset, tmp_path: Path) -> None:
    straight = train(_net(), small_data, CONFIG, device="cpu")
    path = tmp_path / "run.pt"
    _interrupted(small_data, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensors: the file still unpickles
    path.write_bytes(bytes(data))
    seen = []
    keeper = FileCheckpointer(path, on_rejected=seen.append)
    resumed = train(_net(), small_data, CONFIG, device="cpu", checkpoint=keeper)
    assert resumed.history == straight.history  # from step 0: the same numbers
    (rejection,) = seen
    assert rejection.kind == "checkpoint_damaged" and rejection.path == path
    assert rejection.kept_as is not None and rejection.kept_as.read_bytes() == bytes(data)
    # Without a handler, a warning says it.
    _interrupted(small_data, path)
    digest_file(path).unlink()  # as an older covshift left it: no digest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = train(_net(), small_data, CONFIG, device="cpu", checkpoint=path)
    assert again.history == straight.history
    (warning,) = [w for w in caught if w.category is CheckpointWarning]
    assert "has no digest file" in str(warning.message)
    assert "training starts from step 0" in str(warning.message)


def test_a_verified_file_resumes(small_data: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    _interrupted(small_data, path)
    started = []

    class Start:
        def on_train_start(self, state: object) -> None:
            started.append(state.step)  # type: ignore[attr-defined]

    train(_net(), small_data, CONFIG, device="cpu", checkpoint=path, callbacks=[Start()])
    assert started == [20]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # finished: all removed


def test_bytes_with_a_wrong_digest_are_not_resumed_from(small_data: Dataset) -> None:
    straight = train(_net(), small_data, CONFIG, device="cpu")
    sent: list[bytes] = []
    with pytest.raises(KeyboardInterrupt):
        train(
            _net(),
            small_data,
            CONFIG,
            device="cpu",
            checkpoint=BytesCheckpointer(on_save=sent.append),
            callbacks=[_StopAt(25)],
        )
    good = checkpoint_digest(sent[-1])
    changed = bytearray(sent[-1])
    changed[len(changed) // 2] ^= 0x10
    seen = []
    keeper = BytesCheckpointer(bytes(changed), digest=good, on_rejected=seen.append)
    assert train(_net(), small_data, CONFIG, device="cpu", checkpoint=keeper).history == (
        straight.history
    )
    assert [r.reason for r in seen] == ["failed its digest check: its bytes changed on the way"]
    # The right bytes with their digest resume from step 20.
    started = []

    class Start:
        def on_train_start(self, state: object) -> None:
            started.append(state.step)  # type: ignore[attr-defined]

    keeper = BytesCheckpointer(sent[-1], digest=good)
    train(_net(), small_data, CONFIG, device="cpu", checkpoint=keeper, callbacks=[Start()])
    assert started == [20]
