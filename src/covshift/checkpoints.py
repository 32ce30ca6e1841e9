"""Where the resumable state of a training run lives while it trains.

:func:`covshift.train.train` saves its state (model, optimizer, sampler, random
states, evaluation history) at every evaluation through a :class:`Checkpointer`, and
continues from it when one is there at the start. :class:`FileCheckpointer` keeps it
in a file (written to a temporary name, then renamed, so a crash never leaves half a
file); :class:`BytesCheckpointer` keeps it as bytes in memory and hands each new
state to a callback, so that it can travel to another machine (a Ray task sends it
back to the driver with the records made since the last one).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["BytesCheckpointer", "Checkpointer", "FileCheckpointer", "as_checkpointer"]


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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self, device: torch.device) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location=device, weights_only=False)

    def save(self, payload: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FileCheckpointer({str(self.path)!r})"


class BytesCheckpointer:
    """A state kept as serialized bytes; ``on_save(data)`` is called at each save."""

    def __init__(
        self, data: bytes | None = None, on_save: Callable[[bytes], None] | None = None
    ) -> None:
        self.data = data
        self.on_save = on_save

    def load(self, device: torch.device) -> dict[str, Any] | None:
        if self.data is None:
            return None
        return torch.load(io.BytesIO(self.data), map_location=device, weights_only=False)

    def save(self, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
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
