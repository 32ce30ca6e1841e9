"""``covshift clean``: close stale runs and delete checkpoints nothing will load."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from covshift.cli.app import DbOption, existing_store, out_console
from covshift.store import (
    DEFAULT_DB,
    close_stale_runs,
    orphan_checkpoints,
    set_aside_checkpoints,
    stale_runs,
)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def clean(
    db: DbOption = DEFAULT_DB,
    remove: Annotated[
        bool,
        typer.Option(
            "--remove",
            help="Delete stale runs with their records and checkpoints (their points then "
            "run again from the start) instead of marking them failed (kept, resumable).",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be done; change nothing.")
    ] = False,
) -> None:
    """Close stale runs (marked running, their process gone) and delete orphan
    checkpoints (of runs that are gone or done, or of a store no longer in the folder).

    A stale run is marked failed and keeps its checkpoint: the next sweep of its
    experiment resumes it, as it would have anyway. Checkpoints of live runs, and of
    other stores in the same folder, are never touched; checkpoints set aside as
    damaged or unverified are listed and kept (delete them once inspected).

    Example: covshift clean --dry-run --db covshift-out/covshift.db
    """
    with existing_store(db) as store:
        stale = stale_runs(store)
        orphans = orphan_checkpoints(store)
        kept = set_aside_checkpoints(store)
        table = Table(title=f"{'would clean' if dry_run else 'cleaned'} {db}")
        for column in ("what", "why", "done"):
            table.add_column(column, overflow="fold")
        action = "delete" if remove else "mark failed"
        closed = stale if dry_run else close_stale_runs(store, stale, remove=remove)
        closed_ids = {r.id for r in closed}
        for run in stale:
            why = f"stale: process {run.pid} on {run.host} is gone (step {run.last_step})"
            done = (
                f"would {action}"
                if dry_run
                else ("deleted" if remove else "marked failed")
                if run.id in closed_ids
                else "left: claimed again meanwhile"
            )
            table.add_row(f"run {run.id} ({run.name})", why, done)
        # Checkpoints of the runs just deleted went with them; the rest are listed.
        for orphan in orphans:
            if not dry_run:
                orphan.path.unlink(missing_ok=True)
            table.add_row(
                f"{orphan.path.name} ({_megabytes(orphan.size)})",
                orphan.reason,
                "would delete" if dry_run else "deleted",
            )
        for aside in kept:
            table.add_row(
                f"{aside.path.name} ({_megabytes(aside.size)})",
                aside.reason,
                "kept: delete it once inspected",
            )
    if not stale and not orphans and not kept:
        out_console.print(f"nothing to clean in {db}: no stale run, no orphan checkpoint")
        return
    out_console.print(table)
    freed = sum(o.size for o in orphans)
    verb = "would be" if dry_run else "were"
    aside = (
        f"; {len(kept)} checkpoint file{'s' * (len(kept) != 1)} set aside as damaged or "
        f"unverified {'are' if len(kept) != 1 else 'is'} kept in {kept[0].path.parent} "
        "(delete them once inspected)"
        if kept
        else ""
    )
    out_console.print(
        f"{len(stale)} stale run{'s' * (len(stale) != 1)} and {len(orphans)} orphan "
        f"checkpoint{'s' * (len(orphans) != 1)} ({_megabytes(freed)}) {verb} cleaned{aside}.",
        highlight=False,
        soft_wrap=True,
    )
