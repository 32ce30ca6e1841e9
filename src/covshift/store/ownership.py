"""Who owns a run: the process (host and pid) recorded with a run marked ``running``.

A run is owned by the process that is training it. A process killed outright cannot
close its run, so a run whose owner is gone from this host is *stale*: reported as
such and free to be claimed. A process on another host cannot be checked, so its runs
count as owned.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

from covshift.store.rows import RunInfo

__all__ = ["held_elsewhere", "marked_stale", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (a killed
    process whose parent has not reaped it yet still answers ``kill(pid, 0)``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def held_elsewhere(run: RunInfo) -> bool:
    """Whether another process may still be training ``run`` (a process on another
    host cannot be checked, so it counts as alive; this process is the owner)."""
    if run.host != socket.gethostname() or not run.pid:
        return True
    return run.pid != os.getpid() and pid_alive(run.pid)


def marked_stale(run: RunInfo) -> RunInfo:
    """``run`` with status ``stale`` if it is marked running by a dead process here."""
    if (
        run.status == "running"
        and run.host == socket.gethostname()
        and run.pid
        and run.pid != os.getpid()
        and not pid_alive(run.pid)
    ):
        return replace(run, status="stale")
    return run
