"""The command-line app and what its commands share: options, consoles, path checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from covshift._version import __version__
from covshift.store import Store

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

err_console = Console(stderr=True)
out_console = Console()

# Beyond these a run is a typo, not a plan: torch crashes on 100,000 threads.
MAX_THREADS = 1024
MAX_WORKERS = 1024

DbOption = Annotated[Path, typer.Option("--db", help="SQLite results store.", show_default=True)]
# Where the points run: shared by run and claims.
WorkersOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=MAX_WORKERS,
        help="Points trained at once (local backend; default: one per core).",
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        min=1, max=MAX_THREADS, help="Torch threads per point (default: cores / workers; Ray: 1)."
    ),
]
MembersOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=1024,
        help="Points trained together as one batched model (default: the planner "
        "chooses from timed steps; 1: every point alone, the one-at-a-time path).",
    ),
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


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. --set optimizer.lr=0.1), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def print_note(text: str) -> None:
    """A note on stderr that qualifies the output (e.g. points whose runs have not
    ended), printed as written: its brackets and paths are not rich markup."""
    err_console.print(f"[yellow]Note:[/] {escape(text)}", highlight=False)


def existing_store(db: Path) -> Store:
    """Open a store that must already exist (reading commands never create one)."""
    if not db.exists():
        raise UserError(
            f"no store at {db}; run an experiment first (covshift run ioffe2015) or pass --db"
        )
    return Store(db, create=False)


def check_folder(path: Path, option: str) -> None:
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


def report_dir(store_path: Path, experiment_id: str, out: Path | None) -> Path:
    return out if out is not None else store_path.parent / "reports" / experiment_id
