"""Where the resumable state of a training run lives while it trains.

:func:`covshift.train.train` saves its state (model, optimizer, sampler, random
states, evaluation history) at every evaluation through a :class:`Checkpointer`, and
continues from it when one is there at the start. :class:`FileCheckpointer` keeps it
in a file (written to a temporary name, then renamed, so a crash never leaves half a
file); :class:`BytesCheckpointer` keeps it as bytes in memory and hands each new
state to a callback, so that it can travel to another machine (a Ray task sends it
back to the driver with the records made since the last one).

A checkpointer may carry an ``owner``, the identity of the run it belongs to (covshift
uses ``<store id>/run-<run id>``): every state it saves records the owner, and a state
that records another owner is refused on load, so a run never continues from another
run's (or another store's) state even when a file is copied or renamed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = [
    "BytesCheckpointer",
    "CheckpointOwnerError",
    "Checkpointer",
    "FileCheckpointer",
    "as_checkpointer",
]

OWNER_KEY = "owner"


class CheckpointOwnerError(ValueError):
    """A saved state records another run as its owner."""


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
    """A state in one file, replaced atomically at each save."""

    def __init__(self, path: str | os.PathLike[str], owner: str | None = None) -> None:
        self.path = Path(path)
        self.owner = owner

    def load(self, device: torch.device) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        payload = torch.load(self.path, map_location=device, weights_only=False)
        return _check_owner(payload, self.owner, f"checkpoint {self.path}")

    def save(self, payload: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(_stamp(payload, self.owner), tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FileCheckpointer({str(self.path)!r})"


class BytesCheckpointer:
    """A state kept as serialized bytes; ``on_save(data)`` is called at each save."""

    def __init__(
        self,
        data: bytes | None = None,
        on_save: Callable[[bytes], None] | None = None,
        owner: str | None = None,
    ) -> None:
        self.data = data
        self.on_save = on_save
        self.owner = owner

    def load(self, device: torch.device) -> dict[str, Any] | None:
        if self.data is None:
            return None
        payload = torch.load(io.BytesIO(self.data), map_location=device, weights_only=False)
        return _check_owner(payload, self.owner, "the checkpoint sent with this task")

    def save(self, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(_stamp(payload, self.owner), buffer)
        self.data = buffer.getvalue()
        if self.on_save is not None:
            self.on_save(self.data)

    def clear(self) -> None:
        self.data = None


def as_checkpointer(
    checkpoint: str | os.PathLike[str] | Checkpointer | None,
) -> Checkpointer | None:
    """A path becomes a :class:`FileCheckpointer`; a checkpointer or None is kept."""
    if checkpoint is None or hasattr(checkpoint, "save"):
        return checkpoint  # type: ignore[return-value]
    return FileCheckpointer(checkpoint)  # type: ignore[arg-type]
