"""The commands that read the store: ``runs``, ``report``, and ``presets``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from covshift.cli.app import DbOption, existing_store, out_console, print_note, report_dir
from covshift.experiments.config_files import load_config, preset_names
from covshift.store import DEFAULT_DB, Event, RunInfo


def runs(
    db: DbOption = DEFAULT_DB,
    experiment: Annotated[str | None, typer.Option(help="Only this experiment's runs.")] = None,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale",
            help="Only stale runs: marked running, but their process is gone "
            "(covshift clean closes them).",
        ),
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many runs.")] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the runs as JSON (strict: null, never NaN).")
    ] = False,
) -> None:
    """List the runs in the store, newest first (a run killed outright shows as stale).

    Example: covshift runs --stale --db covshift-out/covshift.db
    """
    with existing_store(db) as store:
        rows = [r for r in store.runs(experiment=experiment) if not stale or r.status == "stale"]
        rows = rows[:limit]
        accuracy = {r.id: store.scalars(r.id, "test_accuracy")[1] for r in rows}
        events = {r.id: store.events(r.id) for r in rows}
    if as_json:
        listed = [_run_json(r, accuracy[r.id], events[r.id]) for r in rows]
        print(json.dumps(listed, indent=2, allow_nan=False))
        return
    if not rows:
        what = "stale runs" if stale else "runs" + (f" of {experiment}" if experiment else "")
        out_console.print(f"no {what} in {db}", highlight=False)
        return
    table = Table(title=f"{'stale ' if stale else ''}runs in {db}")
    for col in ("id", "experiment", "run", "status", "step", "test acc", "started (UTC)"):
        table.add_column(
            col, justify="right" if col in ("id", "step", "test acc") else "left", overflow="fold"
        )
    for r in rows:
        acc = accuracy[r.id]
        status = r.status + (f" at {r.diverged_at}" if r.diverged_at is not None else "")
        table.add_row(
            str(r.id),
            r.experiment or "-",
            r.name.partition("/")[2] or r.name,
            status,
            str(r.last_step),
            f"{acc[-1]:.4f}" if len(acc) else "-",
            r.started_at.replace("T", " ")[:19],
        )
    out_console.print(table)
    for r in rows:  # what happened to a run that its row does not say
        for event in events[r.id]:
            out_console.print(
                f"run {r.id}, {event.at.replace('T', ' ')[:19]}: {event.message}",
                highlight=False,
                soft_wrap=True,
                markup=False,
            )


def _run_json(run: RunInfo, accuracy: np.ndarray, events: list[Event]) -> dict[str, Any]:
    """One run as ``covshift runs --json`` prints it (its config left out)."""
    final = float(accuracy[-1]) if len(accuracy) else None
    return {
        "id": run.id,
        "experiment": run.experiment,
        "point": run.point,
        "name": run.name,
        "seed": run.seed,
        "status": run.status,
        "step": run.last_step,
        "diverged_at": run.diverged_at,
        "test_accuracy": final if final is not None and math.isfinite(final) else None,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "host": run.host,
        "pid": run.pid,
        "error": run.error,
        "events": [
            {"at": e.at, "kind": e.kind, "path": e.path, "message": e.message} for e in events
        ],
    }


def presets() -> None:
    """List the shipped experiment presets, with their measured runtime per size.

    The minutes are those of every point trained one at a time (``--members 1``, as
    they were measured); a run's own estimate, with its points batched as the planner
    chooses on this machine, is printed by ``covshift run PRESET --dry-run`` (or
    ``covshift claims --dry-run`` for the battery).

    Example: covshift presets
    """
    from covshift.experiments.battery import BATTERY

    table = Table(
        title="presets: training minutes on 2 cores, 2 workers, empty store, one point "
        "at a time (--members 1; measured; est. = the preflight's estimate). With batched "
        "members: `covshift run PRESET --dry-run` estimates it on this machine"
    )
    # Names and minutes never wrap (they are what a user copies); titles do.
    table.add_column("name", no_wrap=True)
    table.add_column("what it tests")
    table.add_column("quick", justify="right", no_wrap=True)
    table.add_column("full", justify="right", no_wrap=True)
    table.add_column("battery", no_wrap=True)
    for name in preset_names():
        config = load_config(name)
        minutes = []
        for size in ("quick", "full"):
            found = config.sizes.get(size)
            if found is None:
                minutes.append("-")
            elif found.minutes is None:
                minutes.append("yes")
            else:
                minutes.append(f"{found.minutes:g} min" + (" (est.)" if found.estimated else ""))
        table.add_row(name, config.title, *minutes, "yes" if name in BATTERY else "")
    out_console.print(table)


def report(
    experiment: Annotated[
        str, typer.Argument(metavar="EXPERIMENT", help="Experiment id (see `covshift runs`).")
    ],
    db: DbOption = DEFAULT_DB,
    out: Annotated[Path | None, typer.Option(help="Report folder.")] = None,
) -> None:
    """Rebuild the report and claims of a recorded experiment from the store.

    Example: covshift report ioffe2015-3f2a9c1b
    """
    from covshift.experiments.experiment_summary import stored_config, summarize, unfinished_note
    from covshift.report import write_report

    with existing_store(db) as store:
        config = stored_config(store, experiment)
        summary = summarize(store, experiment, config)
        index = write_report(
            store, experiment, config, summary, report_dir(store.path, experiment, out)
        )
        note = unfinished_note(summary, experiment, store.path)
    if note:
        print_note(note)
    out_console.print(f"Report: {index}")
