"""The ``covshift`` command line.

Examples::

    covshift run ioffe2015                       # the paper's setup, report on disk
    covshift run ioffe2015 --steps 2000 --json   # headline numbers as JSON on stdout
    covshift run ioffe2015 --dataset mnist --data-dir ~/mnist --lr 0.1
    covshift run ioffe2015 --set model.init_std=0.05 --set probe.every=50
    covshift run ioffe2015 --resume ioffe2015-20261125-101500-ab12
    covshift runs                                # what the store holds, newest first
    covshift report ioffe2015-20261125-101500-ab12
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from covshift._version import __version__
from covshift.data import DatasetError, dataset_names
from covshift.experiments.config import ConfigError, ExperimentConfig, load_config, preset_names
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


def _report_dir(store: Store, experiment_id: str, out: Path | None) -> Path:
    return out if out is not None else store.path.parent / "reports" / experiment_id


def _summary_table(summary: dict[str, Any], config: ExperimentConfig) -> Table:
    # One column per network, one row per number: fits a terminal for a few networks.
    nets = list(summary["networks"].values())
    table = Table(title=f"{summary['experiment']}: headline numbers")
    table.add_column("number")
    for n in nets:
        table.add_column(n["label"], justify="right")
    for c in [str(c) for c in config.report.checkpoints] + ["final"]:
        name = f"test accuracy at step {c}" if c != "final" else "test accuracy, last step"
        values = [(n.get("test_accuracy") or {}).get(c) for n in nets]
        table.add_row(name, *[f"{v:.4f}" if v is not None else "-" for v in values])
    layers: list[str] = []
    for n in nets:
        layers += [x for x in (n.get("drift") or {}) if x not in layers]
    for layer in layers:
        values = [(n.get("drift") or {}).get(layer) for n in nets]
        table.add_row(f"drift {layer}", *[f"{v:.3f}" if v is not None else "-" for v in values])
    return table


def _claims_table(summary: dict[str, Any]) -> Table:
    table = Table(title="claims")
    table.add_column("claim")
    table.add_column("verdict")
    colors = {"holds": "green", "does not hold": "red", "not measured": "dim"}
    for c in summary["claims"]:
        table.add_row(c["text"], f"[{colors[c['verdict']]}]{c['verdict']}[/]")
    return table


@app.command()
def run(
    preset: Annotated[
        str,
        typer.Argument(
            metavar="PRESET",
            help="A shipped preset (see `covshift presets`) or a path to a .toml file.",
        ),
    ],
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
    resume: Annotated[
        str | None,
        typer.Option(help="Continue an interrupted experiment (its id from `covshift runs`)."),
    ] = None,
    db: DbOption = DEFAULT_DB,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: reports/<experiment id> beside the store)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the headline numbers as JSON on stdout (progress goes to stderr)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run an experiment preset, record it in the store and write its report.

    Example: covshift run ioffe2015 --steps 2000 --json
    """
    from covshift.callbacks import make_progress
    from covshift.experiments.runner import run_experiment, stored_config
    from covshift.experiments.summary import summarize
    from covshift.report import write_report

    flags = {
        "steps": steps,
        "seed": seed,
        "dataset": dataset,
        "data_dir": str(data_dir) if data_dir else None,
        "optimizer.lr": lr,
        "optimizer.momentum": momentum,
        "batch_size": batch_size,
        "eval_every": eval_every,
        "probe.every": probe_every,
        "device": device,
    }
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    overrides.update(_parse_sets(set_ or []))
    store = _existing_store(db) if resume is not None else Store(db)
    if resume is not None:
        if overrides:
            raise UserError(
                "--resume continues an experiment with its recorded settings; "
                f"drop the overrides ({', '.join(overrides)})"
            )
        config = stored_config(store, resume)
    else:
        config = load_config(preset, overrides)
    console = _err if as_json else _out
    with make_progress(disable=quiet) as progress:
        progress.console.file = sys.stderr if as_json else sys.stdout
        try:
            result = run_experiment(config, store, resume=resume, progress=progress)
        except KeyboardInterrupt:
            progress.stop()
            experiment = resume or (store.runs()[0].experiment if store.runs() else None)
            _err.print(
                f"[yellow]Interrupted.[/] What was recorded stays in {store.path}. "
                f"Resume with: covshift run {preset} --resume {experiment}",
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
    summary = summarize(store, result.experiment_id, config)
    index = write_report(
        store, result.experiment_id, config, summary, _report_dir(store, result.experiment_id, out)
    )
    summary["report"] = str(index)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(_summary_table(summary, config))
        if summary["claims"]:
            console.print(_claims_table(summary))
        console.print(f"Report: {index}")


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
        table.add_row(
            str(r.id),
            r.experiment or "-",
            r.name.rpartition("/")[2],
            r.status,
            str(r.last_step),
            f"{acc[-1]:.4f}" if len(acc) else "-",
            r.started_at.replace("T", " ")[:19],
        )
    _out.print(table)


@app.command()
def presets() -> None:
    """List the shipped experiment presets.

    Example: covshift presets
    """
    table = Table(title="presets")
    table.add_column("name")
    table.add_column("title")
    for name in preset_names():
        table.add_row(name, load_config(name).title)
    _out.print(table)


@app.command()
def report(
    experiment: Annotated[
        str, typer.Argument(metavar="EXPERIMENT", help="Experiment id (see `covshift runs`).")
    ],
    db: DbOption = DEFAULT_DB,
    out: Annotated[Path | None, typer.Option(help="Report folder.")] = None,
) -> None:
    """Rebuild the report of a recorded experiment from the store.

    Example: covshift report ioffe2015-20261125-101500-ab12
    """
    from covshift.experiments.runner import stored_config
    from covshift.experiments.summary import summarize
    from covshift.report import write_report

    store = _existing_store(db)
    config = stored_config(store, experiment)
    summary = summarize(store, experiment, config)
    index = write_report(store, experiment, config, summary, _report_dir(store, experiment, out))
    _out.print(f"Report: {index}")


def main() -> None:
    """Entry point: runs the app, turning known errors into one-line messages."""
    try:
        app()
    except (UserError, ConfigError, DatasetError, StoreError, ValueError) as e:
        # soft_wrap: the message is printed whole, never cut at the terminal width.
        _err.print(f"[bold red]Error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
