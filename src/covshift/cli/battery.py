"""``covshift claims``: the battery, every claim of the textbook account."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from covshift.cli.app import (
    AddressOption,
    BackendOption,
    DbOption,
    MembersOption,
    ThreadsOption,
    UserError,
    WorkersOption,
    check_folder,
    err_console,
    out_console,
    parse_sets,
    print_note,
)
from covshift.experiments.config import MAX_SEED_COUNT
from covshift.store import DEFAULT_DB


def claims(
    size: Annotated[str, typer.Option(help="quick (minutes) or full (hours).")] = "quick",
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run and report only these presets (repeatable)."),
    ] = None,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
    members: MembersOption = None,
    backend: BackendOption = "local",
    address: AddressOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would run and the estimate; run nothing.")
    ] = False,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1, max=MAX_SEED_COUNT, help="Seeds 0 .. N-1 for every preset (default: theirs)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field in every preset, as in covshift run."),
    ] = None,
    db: DbOption = DEFAULT_DB,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: reports/battery-<size> beside the store)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the claims as JSON on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the battery (every claim of the textbook account, one preset per group):
    what the store does not hold yet, then one claims.html and claims.json.

    Example: covshift claims --size quick
    """
    from covshift.cli.tables import claims_table
    from covshift.experiments.battery import BATTERY, plan_battery
    from covshift.experiments.battery_run import report_battery, run_battery
    from covshift.experiments.experiment_summary import json_safe

    if size not in ("quick", "full"):
        raise UserError(f"--size must be quick or full, got {size!r}")
    chosen = list(only or BATTERY)
    unknown = [p for p in chosen if p not in BATTERY]
    if unknown:
        raise UserError(
            f"--only {', '.join(unknown)}: not battery presets; battery: {', '.join(BATTERY)}"
        )
    console = err_console if as_json else out_console
    overrides: dict[str, Any] = parse_sets(set_ or [])
    if seeds is not None:
        overrides["seeds"] = seeds
    check_folder(db.parent, "--db")
    if out is not None:
        check_folder(out, "--out")
    parts = plan_battery(size, db, chosen, overrides)
    try:
        run_battery(
            parts,
            db,
            backend=backend,
            workers=workers,
            threads=threads,
            address=address,
            dry_run=dry_run,
            quiet=quiet,
            console=console,
            members=members,
        )
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]Interrupted[/]. What was recorded stays in the store; the same command "
            "resumes the battery.",
            highlight=False,
        )
        raise typer.Exit(130) from None
    if dry_run:
        return
    out_dir = out if out is not None else db.parent / "reports" / f"battery-{size}"
    results, page, notes = report_battery(parts, db, out_dir, size=size)
    if as_json:
        print(json.dumps(json_safe({"claims": results}), indent=2, allow_nan=False))
    else:
        console.print(claims_table({"claims": results}))
        console.print(f"Report: {page}")
    for note in notes:
        print_note(note)
