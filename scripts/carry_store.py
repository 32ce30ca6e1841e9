#!/usr/bin/env python
"""Carry a results store to another machine: one archive with everything a resume needs.

    python scripts/carry_store.py pack STORE ARCHIVE.tar.xz
    python scripts/carry_store.py unpack ARCHIVE.tar.xz FOLDER

A long sweep or battery that outlives the machine it started on (a working session
whose machine is wiped afterwards) resumes elsewhere only if the store *and* the
checkpoints of its unfinished runs travel together. ``pack`` writes

- ``covshift.db``: a consistent copy of the store (SQLite's ``VACUUM INTO``, which
  reads one snapshot, so the copy never holds half a write and carries no WAL file);
- ``checkpoints/<store id>-run-<id>.pt`` and its ``.sha256``, for every run that has
  not ended (``interrupted`` or ``failed``): the state ``covshift run``/``claims``
  resume from. A checkpoint is found by the store's identity, which the copy keeps,
  and verified against its checksum before it is loaded, so a copy cannot resume from
  the wrong file. Finished runs need none.

``pack`` refuses a store with a run marked ``running``: its checkpoint may be ahead of
what the store recorded, or being written. Stop the sweep first (Ctrl-C or SIGTERM:
the run is recorded ``interrupted`` with its checkpoint), or, where its process is
gone, ``covshift clean --db STORE`` marks it ``failed`` (still resumable).

``unpack`` extracts into FOLDER, refusing to overwrite a store there; resume with the
same command and ``--db FOLDER/covshift.db``.

Run from the repository root.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tarfile
import tempfile
from pathlib import Path

from covshift.checkpoint_files import digest_file
from covshift.experiments.numbers import COMPLETE_STATUSES
from covshift.store import Store, StoreError


def _runs_by_status(store: Store) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for run in store.runs():
        out.setdefault(run.status, []).append(run.id)
    return out


def _counts(statuses: dict[str, list[int]]) -> str:
    return ", ".join(f"{len(ids)} {s}" for s, ids in sorted(statuses.items()))


def pack(store: Path, archive: Path) -> str:
    """Writes ``archive`` (tar.xz) from ``store``; returns a one-line summary."""
    if not store.is_file():
        raise SystemExit(f"error: {store}: no such store file")
    if archive.exists():
        raise SystemExit(f"error: {archive} exists; give a new archive name")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "covshift.db"
        try:
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as con:
                con.execute("VACUUM INTO ?", (str(copy),))
        except sqlite3.DatabaseError as e:
            raise SystemExit(f"error: {store}: {e}; is it a covshift store?") from None
        with Store(copy, create=False) as copied:
            statuses = _runs_by_status(copied)
            if statuses.get("running"):
                ids = ", ".join(map(str, statuses["running"][:10]))
                raise SystemExit(
                    f"error: {store} has runs marked running (ids {ids}): stop the sweep "
                    "first (Ctrl-C or SIGTERM), or run `covshift clean --db STORE` if its "
                    "process is gone; then pack again"
                )
            unfinished = sorted(
                i for s, ids in statuses.items() if s not in COMPLETE_STATUSES for i in ids
            )
            # The copy keeps the store's identity, so its checkpoint names are the
            # original's; the files themselves lie beside the original.
            names = [copied.checkpoint_path(i).name for i in unfinished]
        checkpoint_files = [store.parent / "checkpoints" / name for name in names]
        files = [
            path
            for checkpoint in checkpoint_files
            for path in (checkpoint, digest_file(checkpoint))
            if path.is_file()
        ]
        # Written under a temporary name and renamed when whole: an interrupted pack
        # leaves no archive that looks complete.
        partial = archive.with_name(archive.name + ".partial")
        # Its folder may be gone: `git rm` of the last archive in it removes it too.
        archive.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(partial, "w:xz") as tar:
                tar.add(copy, arcname="covshift.db")
                for path in files:
                    tar.add(path, arcname=f"checkpoints/{path.name}")
            partial.replace(archive)
        finally:
            partial.unlink(missing_ok=True)
    checkpoints = sum(path in checkpoint_files for path in files)
    return (
        f"packed {store} into {archive} ({archive.stat().st_size / 2**20:.1f} MB): "
        f"runs {_counts(statuses)}; "
        f"{checkpoints} checkpoint(s) of {len(unfinished)} unfinished run(s)"
    )


def unpack(archive: Path, folder: Path) -> str:
    """Extracts ``archive`` into ``folder``; returns a one-line summary."""
    if (folder / "covshift.db").exists():
        raise SystemExit(f"error: {folder / 'covshift.db'} exists; unpack into another folder")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        names = tar.getnames()
        allowed = {"covshift.db", "checkpoints"}
        stray = [n for n in names if n.split("/")[0] not in allowed or ".." in n.split("/")]
        if stray or "covshift.db" not in names:
            raise SystemExit(f"error: {archive} is not an archive of carry_store.py pack")
        tar.extractall(folder, filter="data")
    with Store(folder / "covshift.db", create=False) as unpacked:
        counts = _counts(_runs_by_status(unpacked))
    return f"unpacked {archive} into {folder}: runs {counts}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="store -> archive")
    p.add_argument("store", type=Path)
    p.add_argument("archive", type=Path)
    u = commands.add_parser("unpack", help="archive -> folder")
    u.add_argument("archive", type=Path)
    u.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            print(pack(args.store, args.archive))
        else:
            print(unpack(args.archive, args.folder))
    except StoreError as e:  # not a covshift store, or a damaged one: the store says
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
