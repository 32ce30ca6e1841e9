"""Where the resumable state of a training run lives while it trains.

:func:`covshift.training.train` saves its state (model, optimizer, sampler, random
states, evaluation history) at every evaluation through a :class:`Checkpointer`, and
continues from it when one is there at the start. :class:`FileCheckpointer` keeps it
in a file with the digest of its bytes beside it (written to temporary names, then
renamed, so a crash never leaves half a file; see :mod:`covshift.checkpoint_files`);
:class:`BytesCheckpointer` keeps it as bytes in memory and hands each new state to a
callback, so that it can travel to another machine (a Ray task sends it back to the
driver with the records made since the last one).

A state is verified before any of it is loaded: a file whose bytes are not the ones
whose digest was recorded (changed on the disk, cut short), that has no digest (an
older covshift's), or that cannot be unpickled is never resumed from. It is kept
aside under a new name, ``on_rejected`` is told (a sweep records it in the store and
prints it; by default a :class:`CheckpointWarning`), and training starts from step 0,
which gives the numbers an uninterrupted run gives. Bytes handed to a
:class:`BytesCheckpointer` with their ``digest`` are verified the same way.

A checkpointer may carry an ``owner``, the identity of the run it belongs to (covshift
uses ``<store id>/run-<run id>``): every state it saves records the owner, and a state
that records another owner is refused on load, so a run never continues from another
run's (or another store's) state even when a file is copied or renamed.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from covshift.checkpoint_files import (
    DAMAGED,
    Rejected,
    Rejection,
    checkpoint_digest,
    read_checkpoint,
    remove_checkpoint,
    set_aside,
    write_checkpoint,
)

__all__ = [
    "BytesCheckpointer",
    "CheckpointOwnerError",
    "CheckpointWarning",
    "Checkpointer",
    "FileCheckpointer",
    "Rejection",
    "as_checkpointer",
    "checkpoint_digest",
]

OWNER_KEY = "owner"


class CheckpointOwnerError(ValueError):
    """A saved state records another run as its owner."""


class CheckpointWarning(UserWarning):
    """A checkpoint was rejected (damaged, unverified or unreadable) and kept aside;
    training started from step 0 (the default ``on_rejected``)."""


RejectionHandler = Callable[[Rejection], None]


def _warn(rejection: Rejection) -> None:
    warnings.warn(
        CheckpointWarning(f"{rejection.message}; training starts from step 0"), stacklevel=4
    )


def _unpickled(data: bytes, device: torch.device) -> dict[str, Any]:
    """The state in ``data``; :class:`Rejected` when torch cannot read it."""
    try:
        payload = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    except Exception as e:
        raise Rejected(DAMAGED, f"cannot be read by torch.load ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict):
        raise Rejected(DAMAGED, f"holds a {type(payload).__name__}, not a training state")
    return payload


def _stamp(payload: dict[str, Any], owner: str | None) -> dict[str, Any]:
    return payload if owner is None else {**payload, OWNER_KEY: owner}


def _check_owner(payload: dict[str, Any], owner: str | None, where: str) -> dict[str, Any]:
    """``payload`` if it may be resumed by ``owner``; a state without an owner (saved
    by covshift 0.1, or by a checkpointer without one) is accepted."""
    found = payload.get(OWNER_KEY) if isinstance(payload, dict) else None
    if owner is not None and found is not None and found != owner:
        raise CheckpointOwnerError(
            f"{where} belongs to {found}, not to {owner}: it was copied or renamed from "
            "another run or store; move it away (or delete it) to start this run over"
        )
    return payload


class Checkpointer(Protocol):
    """Keeps one training state: the latest saved."""

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """The saved state (tensors on ``device``), or None when there is none."""
        ...

    def save(self, payload: dict[str, Any]) -> None: ...

    def clear(self) -> None:
        """Forget the state (the run ended: there is nothing left to resume)."""
        ...


class FileCheckpointer:
    """A state in one file, replaced atomically at each save, with its digest beside it.

    Args:
        path: the checkpoint file (its digest goes to ``<path>.sha256``).
        owner: the run it belongs to (a state of another owner is refused).
        on_rejected: told of a checkpoint that was not resumed from (see the module);
            default: a :class:`CheckpointWarning`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        owner: str | None = None,
        on_rejected: RejectionHandler | None = None,
    ) -> None:
        self.path = Path(path)
        self.owner = owner
        self.on_rejected = on_rejected or _warn
        self._on_disk: str | None = None  # the digest of the file at path ...
        self._known = False  # ... once a load or save has found it out

    def load(self, device: torch.device) -> dict[str, Any] | None:
        self._on_disk, self._known = None, True
        try:
            found = read_checkpoint(self.path)
            if found is None:
                return None
            data, digest = found
            payload = _unpickled(data, device)
        except Rejected as e:
            self.on_rejected(set_aside(self.path, e))
            return None
        self._on_disk = digest
        return _check_owner(payload, self.owner, f"checkpoint {self.path}")

    def save(self, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(_stamp(payload, self.owner), buffer)
        if not self._known:  # saved to without a load: whatever verified file is there
            try:
                found = read_checkpoint(self.path)
            except Rejected:
                found = None
            self._on_disk, self._known = (None if found is None else found[1]), True
        self._on_disk = write_checkpoint(self.path, buffer.getvalue(), previous=self._on_disk)

    def clear(self) -> None:
        remove_checkpoint(self.path)
        self._on_disk, self._known = None, True

    def __repr__(self) -> str:
        return f"FileCheckpointer({str(self.path)!r})"


class BytesCheckpointer:
    """A state kept as serialized bytes; ``on_save(data)`` is called at each save.

    Args:
        data: a saved state to resume from (None: start afresh).
        on_save: called with the bytes of every new state (``self.digest`` is theirs).
        owner: the run it belongs to (a state of another owner is refused).
        digest: the SHA-256 of ``data`` (:func:`checkpoint_digest`), as recorded when
            it was saved: ``data`` is verified against it before it is loaded, and
            not resumed from when it differs. Without one, ``data`` is taken as the
            caller's own (covshift's Ray backend always sends it).
        on_rejected: told of a state that was not resumed from (default: a
            :class:`CheckpointWarning`).
    """

    def __init__(
        self,
        data: bytes | None = None,
        on_save: Callable[[bytes], None] | None = None,
        owner: str | None = None,
        digest: str | None = None,
        on_rejected: RejectionHandler | None = None,
    ) -> None:
        self.data = data
        self.on_save = on_save
        self.owner = owner
        self.digest = digest
        self.on_rejected = on_rejected or _warn

    def load(self, device: torch.device) -> dict[str, Any] | None:
        if self.data is None:
            return None
        try:
            if self.digest is not None and checkpoint_digest(self.data) != self.digest:
                raise Rejected(DAMAGED, "failed its digest check: its bytes changed on the way")
            payload = _unpickled(self.data, device)
        except Rejected as e:
            self.data = self.digest = None
            self.on_rejected(Rejection(None, None, e.kind, e.reason))
            return None
        return _check_owner(payload, self.owner, "the checkpoint sent with this task")

    def save(self, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(_stamp(payload, self.owner), buffer)
        self.data = buffer.getvalue()
        self.digest = checkpoint_digest(self.data)
        if self.on_save is not None:
            self.on_save(self.data)

    def clear(self) -> None:
        self.data = self.digest = None


def as_checkpointer(
    checkpoint: str | os.PathLike[str] | Checkpointer | None,
) -> Checkpointer | None:
    """A path becomes a :class:`FileCheckpointer`; a checkpointer or None is kept."""
    if checkpoint is None or hasattr(checkpoint, "save"):
        return checkpoint  # type: ignore[return-value]
    return FileCheckpointer(checkpoint)  # type: ignore[arg-type]
