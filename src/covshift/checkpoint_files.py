"""A checkpoint file and its proof: written atomically with a digest of its bytes, and
verified against that digest before any of it is loaded.

A checkpoint ``run.pt`` holds :func:`torch.save`'s bytes, unchanged; beside it,
``run.pt.sha256`` (its *digest file*, JSON) records the SHA-256 of those bytes, their
length, and the digest of the file it replaced::

    {"sha256": "<hex>", "bytes": 1234567, "previous": "<hex>" | null}

A save writes the bytes to ``run.pt.tmp`` (flushed to the disk), then the new digest
file (to a temporary name, renamed over the old one), then renames ``run.pt.tmp``
over ``run.pt``. Killed at any moment, this leaves at ``run.pt`` either the old file
or the new one, and the digest file lists both: the file is always one it vouches for.
A load reads the bytes once, hashes them, and hands them on only when their digest is
listed; anything else is *rejected* (:class:`Rejected`), and the file is kept aside
under a new name (:func:`set_aside`), never deleted and never loaded:

- ``checkpoint_damaged``: its digest is not the one recorded (bytes changed on the
  disk, a file cut short), or its digest file cannot be read;
- ``checkpoint_unverified``: it has no digest file (written by covshift before
  checkpoints had one, or by hand), so nothing says it is what was saved.

A file that cannot be read or written at all (a full disk, an I/O error) raises a
:class:`~covshift.store.errors.StorageFault` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from covshift.store.errors import file_fault

__all__ = [
    "DIGEST_SUFFIX",
    "Rejected",
    "Rejection",
    "checkpoint_digest",
    "digest_file",
    "read_checkpoint",
    "remove_checkpoint",
    "set_aside",
    "write_checkpoint",
]

DIGEST_SUFFIX = ".sha256"
DAMAGED = "checkpoint_damaged"
UNVERIFIED = "checkpoint_unverified"


def checkpoint_digest(data: bytes) -> str:
    """SHA-256 of a checkpoint's bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


def digest_file(path: Path) -> Path:
    """Where the digest of checkpoint ``path`` is kept."""
    return path.with_name(path.name + DIGEST_SUFFIX)


class Rejected(Exception):
    """A checkpoint that must not be loaded: ``kind`` (``checkpoint_damaged`` or
    ``checkpoint_unverified``) and why, in words."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Rejection:
    """A checkpoint that was rejected: where it was, where it was kept aside (None:
    it was not a file, e.g. bytes sent to a Ray task), what kind, and why."""

    path: Path | None
    kept_as: Path | None
    kind: str
    reason: str

    @property
    def message(self) -> str:
        where = f"checkpoint {self.path}" if self.path is not None else "the checkpoint"
        kept = f"; kept aside as {self.kept_as}" if self.kept_as is not None else ""
        return f"{where} {self.reason}{kept}"


def _write_file(path: Path, data: bytes) -> None:
    """``data`` into ``path`` (a temporary name), flushed to the disk; on a failure the
    part written is removed."""
    try:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        if e.filename is None:  # write() and fsync() do not say which file
            e.filename = str(path)
        raise


def write_checkpoint(path: Path, data: bytes, *, previous: str | None) -> str:
    """Save ``data`` as checkpoint ``path`` with its digest (see the module); returns
    the digest. ``previous``: the digest of the file now at ``path`` (None if none),
    which the digest file keeps listing until the new file is in place. A file that
    cannot be written raises a :class:`~covshift.store.errors.StorageFault` naming
    ``path``; what was at ``path`` before stays, and stays verified."""
    digest = checkpoint_digest(data)
    tmp = path.with_name(path.name + ".tmp")
    sidecar = digest_file(path)
    sidecar_tmp = sidecar.with_name(sidecar.name + ".tmp")
    proof = json.dumps({"sha256": digest, "bytes": len(data), "previous": previous})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(tmp, data)
        _write_file(sidecar_tmp, proof.encode())
        os.replace(sidecar_tmp, sidecar)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise file_fault(path, e) from None
    return digest


def _recorded(path: Path) -> dict[str, object]:
    sidecar = digest_file(path)
    try:
        text = sidecar.read_text()
    except FileNotFoundError:
        raise Rejected(
            UNVERIFIED,
            f"has no digest file ({sidecar.name}): nothing says it is the state that was "
            "saved (covshift wrote none before checkpoints carried one)",
        ) from None
    except OSError as e:
        raise file_fault(sidecar, e, "read") from None
    try:
        proof = json.loads(text)
        if not isinstance(proof, dict) or not isinstance(proof.get("sha256"), str):
            raise ValueError("no sha256 entry")
    except ValueError as e:
        reason = f"has a digest file {sidecar.name} that cannot be read ({e})"
        raise Rejected(DAMAGED, reason) from None
    return proof


def read_checkpoint(path: Path) -> tuple[bytes, str] | None:
    """The bytes of checkpoint ``path`` and their digest, once verified (None: there is
    no checkpoint); raises :class:`Rejected` for a file that must not be loaded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise file_fault(path, e, "read") from None
    proof = _recorded(path)
    digest = checkpoint_digest(data)
    if digest in (proof["sha256"], proof.get("previous")):
        return data, digest
    size = proof.get("bytes")
    if digest != proof["sha256"] and isinstance(size, int) and size != len(data):
        what = f"is {len(data)} bytes long, but {size} were saved (cut short or extended)"
    else:
        what = "does not hold the bytes that were saved (changed on the disk)"
    raise Rejected(
        DAMAGED,
        f"failed its digest check: it {what}; SHA-256 {digest[:16]}..., recorded "
        f"{str(proof['sha256'])[:16]}...",
    )


def set_aside(path: Path, rejected: Rejected) -> Rejection:
    """Keep a rejected checkpoint (and its digest file) under a new name beside it:
    ``<name>.damaged-<UTC time>`` or ``<name>.unverified-<UTC time>``."""
    label = "unverified" if rejected.kind == UNVERIFIED else "damaged"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kept = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
    try:
        os.replace(path, kept)
        if digest_file(path).exists():
            os.replace(digest_file(path), digest_file(kept))
    except OSError as e:
        raise file_fault(path, e, "move") from None
    return Rejection(path, kept, rejected.kind, rejected.reason)


def remove_checkpoint(path: Path) -> None:
    """Delete checkpoint ``path``, then its digest file (a digest file alone vouches
    for nothing), and any unfinished save of either."""
    sidecar = digest_file(path)
    tmp = path.with_name(path.name + ".tmp")
    for file in (path, sidecar, tmp, sidecar.with_name(sidecar.name + ".tmp")):
        try:
            file.unlink(missing_ok=True)
        except OSError as e:
            raise file_fault(file, e, "delete") from None
