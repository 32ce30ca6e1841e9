"""Store housekeeping: stale runs and checkpoints that no run will ever resume.

A run killed outright (SIGKILL, a power cut, an out-of-memory kill) stays marked
``running``; :meth:`Store.runs` reports it as ``stale`` once its process is gone from
this host. Such a run is resumed by the next sweep of its experiment, so nothing has to
be done; :func:`close_stale_runs` marks it ``failed`` (kept, still resumable) or
removes it with its records and checkpoint (its point then counts as never run).

Checkpoints live in ``<store folder>/checkpoints/`` as ``<store id>-run-<id>.pt``
(:meth:`Store.checkpoint_path`), each with its digest file ``.pt.sha256``.
:func:`orphan_checkpoints` finds those that nothing will load: a checkpoint (or digest
file) of this store whose run is gone or has a final outcome, a temporary file left
by a kill during a save, and a checkpoint of a store that no longer exists in the
folder (no SQLite file there carries its store id). Checkpoints of another live store
in the same folder are left alone, as are files covshift does not name, and the
checkpoints set aside as damaged or unverified (``.pt.damaged-<time>``,
``.pt.unverified-<time>``), which :func:`set_aside_checkpoints` lists: they are kept
for whoever wants to see what went wrong, and deleted by hand.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from covshift.store.errors import StoreError
from covshift.store.held_files import read_head
from covshift.store.rows import FINAL_OUTCOMES, RunInfo
from covshift.store.store import Store

__all__ = [
    "Orphan",
    "close_stale_runs",
    "orphan_checkpoints",
    "set_aside_checkpoints",
    "stale_runs",
]

_CHECKPOINT_NAME = re.compile(
    r"^(?P<store>[0-9a-f]{12})-run-(?P<run>\d+)\.pt(?P<digest>\.sha256)?(?P<tmp>\.tmp)?$"
)
_SET_ASIDE_NAME = re.compile(
    r"^(?P<store>[0-9a-f]{12})-run-(?P<run>\d+)\.pt\.(?P<why>damaged|unverified)-[0-9TZ-]+(\.sha256)?$"
)
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Orphan:
    """A checkpoint file nothing will load, and why."""

    path: Path
    reason: str
    size: int


def stale_runs(store: Store) -> list[RunInfo]:
    """Runs marked ``running`` whose process is gone from this host, newest first."""
    return [r for r in store.runs() if r.status == "stale"]


def close_stale_runs(store: Store, runs: list[RunInfo], *, remove: bool) -> list[RunInfo]:
    """Mark each stale run of ``runs`` ``failed`` (or delete it, its records and its
    checkpoint, with ``remove``); returns those acted on. A run that a process claimed
    again since it was listed is left alone (the update is conditional on the dead
    owner, in one transaction)."""
    done = []
    for run in runs:
        if remove:
            acted = store.delete_stale_run(run)
            if acted:
                for path in _checkpoint_files(store, run.id):
                    path.unlink(missing_ok=True)
        else:
            acted = store.fail_stale_run(
                run, f"stale: its process {run.pid} on {run.host} ended without closing it"
            )
        if acted:
            done.append(run)
    return done


def _checkpoint_files(store: Store, run_id: int) -> list[Path]:
    path = store.checkpoint_path(run_id)
    names = (path.name, path.name + ".sha256")
    return [path.with_name(n + tmp) for n in names for tmp in ("", ".tmp")]


def _store_ids_in(folder: Path) -> set[str]:
    """The store ids (first 12 hex digits) of every covshift store in ``folder``."""
    ids = set()
    for path in folder.iterdir():
        try:
            if not path.is_file():
                continue
            head = read_head(path, 16)  # None: a store this process has open
            if head is not None and head != _SQLITE_MAGIC:
                continue
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            finally:
                db.close()
        except (OSError, sqlite3.Error):
            continue  # unreadable, or an SQLite file that is not a covshift store
        if row:
            ids.add(str(row[0])[:12])
    return ids


def orphan_checkpoints(store: Store) -> list[Orphan]:
    """The checkpoint files in the store's folder that nothing will load (see the
    module docstring), sorted by name."""
    folder = store.path.parent / "checkpoints"
    if not folder.is_dir():
        return []
    own = store.store_id[:12]
    live_stores = _store_ids_in(store.path.parent)
    orphans = []
    for path in sorted(folder.iterdir()):
        match = _CHECKPOINT_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        reason = None
        if match["store"] != own:
            if match["store"] not in live_stores:
                reason = f"its store ({match['store']}) is not in {store.path.parent}"
        else:
            reason = _own_reason(store, int(match["run"]), bool(match["tmp"]))
        if reason is not None:
            orphans.append(Orphan(path, reason, path.stat().st_size))
    return orphans


def _own_reason(store: Store, run_id: int, temporary: bool) -> str | None:
    """Why this store's checkpoint of ``run_id`` is an orphan (None: it is not)."""
    try:
        run = store.run(run_id)
    except StoreError:
        return f"run {run_id} is not in the store"
    if run.status in FINAL_OUTCOMES:
        return f"run {run_id} is {run.status}"
    if temporary and run.status != "running":
        return f"an unfinished save of run {run_id}, which is {run.status}"
    return None


def set_aside_checkpoints(store: Store) -> list[Orphan]:
    """The checkpoints of this store set aside as damaged or unverified (kept, never
    loaded again; see the module docstring), with what happened, sorted by name."""
    folder = store.path.parent / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        match = _SET_ASIDE_NAME.match(path.name)
        if match is None or match["store"] != store.store_id[:12] or not path.is_file():
            continue
        why = (
            "failed its digest check or could not be read"
            if match["why"] == "damaged"
            else "had no digest (an older covshift's)"
        )
        found.append(
            Orphan(path, f"run {match['run']}'s checkpoint {why}; set aside", path.stat().st_size)
        )
    return found
