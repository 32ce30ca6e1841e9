"""The command line's app: every command registered, and the error handling
of :func:`covshift.cli.main`."""

from __future__ import annotations

import signal
import sys
import traceback

from rich.markup import escape

from covshift.cli.app import UserError, app, err_console
from covshift.cli.battery import claims
from covshift.cli.check import check
from covshift.cli.experiment import run
from covshift.cli.housekeeping import clean
from covshift.cli.records import presets, report, runs
from covshift.data import DatasetError
from covshift.experiments.backends import BackendError
from covshift.experiments.config import ConfigError
from covshift.store import StoreError

__all__ = ["app", "run_app"]

# In the order `covshift --help` lists them.
for command in (run, check, runs, clean, presets, claims, report):
    app.command()(command)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a sweep as Ctrl-C does: recorded, resumable


def run_app() -> None:
    """Runs the app, turning known errors into one-line messages."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except KeyboardInterrupt:
        # Commands that record say what was kept; anywhere else nothing was written.
        err_console.print("[yellow]Interrupted[/].", highlight=False)
        sys.exit(130)
    except (UserError, ConfigError, DatasetError, StoreError, BackendError, ValueError) as e:
        # soft_wrap: the message is printed whole, never cut at the terminal width.
        err_console.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # a path the user named: not writable, a file for a folder, ...
        where = f"{e.filename}: " if e.filename else ""
        err_console.print(
            f"[bold red]Error:[/] {escape(where + str(e.strerror or e))}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except Exception:
        # Anything else is covshift's own bug: the traceback, and a line that says so.
        traceback.print_exc()
        err_console.print(
            "[bold red]This is a bug in covshift[/] (not in your input); please report it "
            "with the traceback above.",
            highlight=False,
        )
        sys.exit(1)
