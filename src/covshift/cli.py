"""The ``covshift`` command line.

Examples::

    covshift run ioffe2015                       # the paper's setup over 3 seeds, report
    covshift run ioffe2015 --steps 2000 --json   # headline numbers and claims as JSON
    covshift run ioffe2015 --seeds 5 --workers 2 --set "sweep.optimizer.lr=[0.1, 0.5]"
    covshift run my-sweep.toml --dry-run         # the grid's points, nothing run
    covshift run my-sweep.toml --backend ray --address auto
    covshift runs                                # what the store holds, newest first
    covshift report ioffe2015-3f2a9c1b
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from covshift._version import __version__
from covshift.data import DatasetError, dataset_names
from covshift.experiments.backends import BackendError
from covshift.experiments.config import ConfigError, load_config, preset_names
from covshift.store import DEFAULT_DB, Store, StoreError

app = typer.Typer(
    name="covshift",
    help="Measure internal covariate shift and compare normalization layers.\n\n"
    "Examples:\n\n"
    "  covshift run ioffe2015\n\n"
    "  covshift run ioffe2015 --steps 2000 --json\n\n"
    "  covshift runs",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True)
_out = Console()

DbOption = Annotated[Path, typer.Option("--db", help="SQLite results store.", show_default=True)]
# Where the points run: shared by run and claims.
WorkersOption = Annotated[
    int | None,
    typer.Option(min=1, help="Points trained at once (local backend; default: one per core)."),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(min=1, help="Torch threads per point (default: cores / workers; Ray: 1)."),
]
BackendOption = Annotated[
    str, typer.Option(help="local (processes on this machine) or ray (Ray tasks).")
]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join (ray start --head prints it; 'auto'): --backend ray."),
]


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def _version(value: bool) -> None:
    if value:
        print(f"covshift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Measure internal covariate shift and compare normalization layers."""


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. --set optimizer.lr=0.1), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _existing_store(db: Path) -> Store:
    """Open a store that must already exist (reading commands never create one)."""
    if not db.exists():
        raise UserError(
            f"no store at {db}; run an experiment first (covshift run ioffe2015) or pass --db"
        )
    return Store(db)


def _check_folder(path: Path, option: str) -> None:
    """A folder covshift will create and write into: refuse it before anything runs
    when a part of it is a plain file or its nearest existing folder is not writable."""
    probe = path.absolute()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{option} {path}: {probe} is a file, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: the folder {probe} is not writable")


def _report_dir(store_path: Path, experiment_id: str, out: Path | None) -> Path:
    return out if out is not None else store_path.parent / "reports" / experiment_id


@app.command()
def run(
    preset: Annotated[
        str | None,
        typer.Argument(
            metavar="[PRESET]",
            help="A shipped preset (see `covshift presets`) or a path to a .toml file.",
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps per network.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of weights and batches.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help=f"Dataset: {', '.join(dataset_names())}.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the IDX files (default: $COVSHIFT_DATA_DIR, then the "
            "dataset's standard place)."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="SGD learning rate.")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Mini-batch size.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Steps between evaluations on the full test set.")
    ] = None,
    probe_every: Annotated[
        int | None, typer.Option(min=1, help="Steps between probe records.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:i].")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override any config field: --set model.init_std=0.05 (repeatable)."
        ),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(min=1, help="Run seeds 0 .. N-1 (instead of the preset's seeds)."),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(help="One of the preset's sizes (quick, full; see covshift presets)."),
    ] = None,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
    backend: BackendOption = "local",
    address: AddressOption = None,
    gpus_per_point: Annotated[
        float, typer.Option(min=0, help="GPUs Ray reserves per point (--backend ray).")
    ] = 0.0,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the grid's points and the estimate; run nothing."),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(help="Run a recorded experiment again by its id (what is finished is kept)."),
    ] = None,
    db: DbOption = DEFAULT_DB,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: reports/<experiment id> beside the store)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the headline numbers and claims as JSON on stdout (progress to stderr).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run an experiment (a shipped preset or a TOML file): every point of its grid
    that the store does not hold yet, then its report and claims.

    Example: covshift run ioffe2015 --steps 2000 --json
    """
    from covshift.cli_tables import claims_table, plan_table, summary_table
    from covshift.experiments.preflight import estimate_seconds, format_seconds, preflight
    from covshift.experiments.summary import json_safe, stored_config, summarize
    from covshift.experiments.sweep import (
        make_backend,
        make_sweep_progress,
        plan_sweep,
        run_sweep,
    )
    from covshift.report import write_report

    flags = {
        "steps": steps,
        "seeds": [seed] if seed is not None else seeds,
        "dataset": dataset,
        "data_dir": str(data_dir) if data_dir else None,
        "optimizer.lr": lr,
        "optimizer.momentum": momentum,
        "batch_size": batch_size,
        "eval_every": eval_every,
        "probe.every": probe_every,
        "device": device,
    }
    if seed is not None and seeds is not None:
        raise UserError("give --seed S (one seed) or --seeds N (seeds 0 .. N-1), not both")
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    overrides.update(_parse_sets(set_ or []))
    if resume is not None:
        if overrides or size:
            raise UserError(
                "--resume runs a recorded experiment with its recorded settings; "
                f"drop the overrides ({', '.join(overrides)})"
            )
        with _existing_store(db) as reading:
            config = stored_config(reading, resume)
    elif preset is None:
        raise UserError("name a preset (covshift presets) or a .toml file, or give --resume ID")
    else:
        config = load_config(preset, overrides, size=size)
    _check_folder(db.parent, "--db")
    if out is not None:
        _check_folder(out, "--out")
    plan = plan_sweep(config, db)
    todo = plan.to_run
    chosen = make_backend(
        backend,
        points=len(todo),
        workers=workers,
        threads=threads,
        address=address,
        gpus=gpus_per_point,
    )
    costs = preflight(config, todo, chosen.threads)  # raises before anything is written
    console = _err if as_json else _out
    lanes = chosen.workers or workers or 1
    nets, seeds_n = len(config.networks), len(config.seeds)
    grid = " x ".join(
        [f"{nets} network{'s' * (nets != 1)}"]
        + [f"{len(v)} {k}" for k, v in config.sweep.items()]
        + [f"{seeds_n} seed{'s' * (seeds_n != 1)}"]
    )
    where = (
        f"{chosen.workers} worker{'s' * (chosen.workers > 1)} x {chosen.threads} thread"
        f"{'s' * (chosen.threads > 1)}"
        if chosen.name != "ray"
        else f"Ray tasks of {chosen.threads} CPU{'s' * (chosen.threads > 1)}"
    )
    estimate = format_seconds(estimate_seconds(todo, costs, lanes)) if todo else "0s"
    console.print(
        f"{plan.experiment_id}: {len(plan.points)} points ({grid}); {len(todo)} to run, "
        f"{len(plan.points) - len(todo)} already recorded; {chosen.name} backend, {where}; "
        f"estimated {estimate}",
        highlight=False,
        soft_wrap=True,
    )
    if dry_run:
        console.print(plan_table(plan))
        return
    store = Store(db)
    with make_sweep_progress(disable=quiet, console=console) as progress:
        try:
            result = run_sweep(plan, store, chosen, progress=progress)
        except KeyboardInterrupt:
            progress.stop()
            _err.print(
                f"[yellow]Interrupted[/] {plan.experiment_id}. What was recorded stays in "
                f"{store.path}; the same command resumes it, as does: "
                f"covshift run --resume {plan.experiment_id} --db {db}",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(130) from None
    summary = summarize(store, plan.experiment_id, config)
    index = write_report(
        store, plan.experiment_id, config, summary, _report_dir(store.path, plan.experiment_id, out)
    )
    summary["report"] = str(index)
    summary["seconds"] = result.seconds
    if as_json:
        print(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    else:
        console.print(summary_table(summary, config))
        if summary["claims"]:
            console.print(claims_table(summary))
        console.print(f"Report: {index}")
    unfinished = [o for o in result.outcomes if o.status in ("failed", "busy")]
    for o in unfinished:
        _err.print(f"[red]{o.status}[/]: point {o.point}: {o.error}", highlight=False)


@app.command()
def runs(
    db: DbOption = DEFAULT_DB,
    experiment: Annotated[str | None, typer.Option(help="Only this experiment's runs.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many runs.")] = 50,
) -> None:
    """List the runs in the store, newest first.

    Example: covshift runs --db covshift-out/covshift.db
    """
    store = _existing_store(db)
    rows = store.runs(experiment=experiment)[:limit]
    table = Table(title=f"runs in {db}")
    for col in ("id", "experiment", "run", "status", "step", "test acc", "started (UTC)"):
        table.add_column(
            col, justify="right" if col in ("id", "step", "test acc") else "left", overflow="fold"
        )
    for r in rows:
        _, acc = store.scalars(r.id, "test_accuracy")
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
    _out.print(table)


@app.command()
def presets() -> None:
    """List the shipped experiment presets, with their measured runtime per size.

    Example: covshift presets
    """
    from covshift.experiments.battery import BATTERY

    table = Table(
        title="presets: training minutes on 2 cores, 2 workers, empty store "
        "(measured; est. = the preflight's estimate)"
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
    _out.print(table)


@app.command()
def claims(
    size: Annotated[str, typer.Option(help="quick (minutes) or full (hours).")] = "quick",
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run and report only these presets (repeatable)."),
    ] = None,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
    backend: BackendOption = "local",
    address: AddressOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would run and the estimate; run nothing.")
    ] = False,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Seeds 0 .. N-1 for every preset (default: theirs).")
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
    from covshift.cli_tables import claims_table
    from covshift.experiments.battery import BATTERY, plan_battery
    from covshift.experiments.battery_run import report_battery, run_battery
    from covshift.experiments.summary import json_safe

    if size not in ("quick", "full"):
        raise UserError(f"--size must be quick or full, got {size!r}")
    chosen = list(only or BATTERY)
    unknown = [p for p in chosen if p not in BATTERY]
    if unknown:
        raise UserError(
            f"--only {', '.join(unknown)}: not battery presets; battery: {', '.join(BATTERY)}"
        )
    console = _err if as_json else _out
    overrides: dict[str, Any] = _parse_sets(set_ or [])
    if seeds is not None:
        overrides["seeds"] = seeds
    _check_folder(db.parent, "--db")
    if out is not None:
        _check_folder(out, "--out")
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
        )
    except KeyboardInterrupt:
        _err.print(
            "[yellow]Interrupted[/]. What was recorded stays in the store; the same command "
            "resumes the battery.",
            highlight=False,
        )
        raise typer.Exit(130) from None
    if dry_run:
        return
    out_dir = out if out is not None else db.parent / "reports" / f"battery-{size}"
    results, page = report_battery(parts, db, out_dir, size=size)
    if as_json:
        print(json.dumps(json_safe({"claims": results}), indent=2, allow_nan=False))
    else:
        console.print(claims_table({"claims": results}))
        console.print(f"Report: {page}")


@app.command()
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
    from covshift.experiments.summary import stored_config, summarize
    from covshift.report import write_report

    with _existing_store(db) as store:
        config = stored_config(store, experiment)
        summary = summarize(store, experiment, config)
        index = write_report(
            store, experiment, config, summary, _report_dir(store.path, experiment, out)
        )
    _out.print(f"Report: {index}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a sweep as Ctrl-C does: recorded, resumable


def main() -> None:
    """Entry point: runs the app, turning known errors into one-line messages."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except (UserError, ConfigError, DatasetError, StoreError, BackendError, ValueError) as e:
        # soft_wrap: the message is printed whole, never cut at the terminal width.
        _err.print(f"[bold red]Error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # a path the user named: not writable, a file for a folder, ...
        where = f"{e.filename}: " if e.filename else ""
        _err.print(f"[bold red]Error:[/] {where}{e.strerror or e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception:
        # Anything else is covshift's own bug: the traceback, and a line that says so.
        traceback.print_exc()
        _err.print(
            "[bold red]This is a bug in covshift[/] (not in your input); please report it "
            "with the traceback above.",
            highlight=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
