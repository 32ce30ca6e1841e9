"""The ``covshift`` command line: one module per group of commands.

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

import sys

__all__ = ["main"]


def main() -> None:
    """Entry point of ``covshift``.

    The commands' modules import torch, which takes seconds: a Ctrl-C meanwhile ends
    the process quietly (nothing has been written yet) instead of in a traceback.
    """
    try:
        from covshift.cli.entry import run_app
    except KeyboardInterrupt:
        print("Interrupted (while starting: nothing was written).", file=sys.stderr)
        sys.exit(130)
    run_app()
