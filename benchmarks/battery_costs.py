"""The claims battery's training minutes before batching (``--members 1``, every point
alone) and after (the planner's batches), estimated and, with ``--measure``, measured;
and where a point's time goes.

For each part of the battery at ``--size`` (its presets and the controls they borrow
from each other, as ``covshift claims`` plans them; ``--seeds``: seeds 0 .. N-1):

- ``steps`` .. ``smooth``: the share of the one-at-a-time estimate spent in training
  steps, evaluations, probe records, gradient ICS and landscape smoothness (the
  preflight's own measurements multiplied out over each point's schedule);
- ``est. alone`` / ``est. batched``: the preflight's estimate with ``--members 1`` and
  with the planner's choice, for ``--workers`` workers of ``--threads`` threads (what
  ``covshift claims --dry-run`` prints), and their ratio;
- with ``--measure``: the wall time of training the preset from an empty store, one
  at a time, then batched, each into its own temporary store (the two runs of a
  preset back to back, so that a busy machine slows both alike), and their ratio.

The last row sums the presets. Measuring runs every preset twice: at quick size a few
minutes, at full size hours (do not measure the full battery on a shared machine).
Timings taken while other processes run are noise; compare the ratios of one run.

    python benchmarks/battery_costs.py                        # estimates, quick size
    python benchmarks/battery_costs.py --size full --seeds 10 # estimates at 10 seeds
    python benchmarks/battery_costs.py --measure --seeds 5    # quick size, measured
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from covshift.experiments import run_experiment
from covshift.experiments.battery import BATTERY, BatteryPart, plan_battery
from covshift.experiments.planner import plan_members
from covshift.experiments.preflight import preflight
from covshift.experiments.sweep import make_backend
from covshift.store import Store


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def _ratio(before: float | None, after: float | None) -> str:
    return "-" if not before or not after else f"{before / after:.1f}x"


def _shares(points: list, costs: dict) -> list[float]:
    """Seconds in steps, evaluations, records, gradient ICS and smoothness."""
    shares = [0.0] * 5
    for p in points:
        c, s, pr = costs[p.id], p.spec, p.spec.probe
        records = (s.steps // pr.every + 1) * (2 if pr.mode == "both" else 1)
        records += 2 if pr.noise_floor else 0
        shares[0] += s.steps * c.step
        shares[1] += (s.steps // s.eval_every + 2) * c.evaluation
        shares[2] += records * c.record
        if pr.gradient_ics_every:
            shares[3] += (s.steps // pr.gradient_ics_every + 1) * c.gradient_ics
        if pr.smoothness_every:
            shares[4] += (s.steps // pr.smoothness_every + 1) * c.smoothness
    return shares


def _estimates(part: BatteryPart, workers: int, threads: int) -> tuple[float, float, str, list]:
    """Seconds estimated alone and batched, the batch sizes the planner chose, and the
    one-at-a-time seconds by kind of work."""
    points = part.plan.to_run
    costs = preflight(part.config, points, threads)
    alone = plan_members(points, costs, lanes=workers, threads=threads, members=1)
    batched = plan_members(points, costs, lanes=workers, threads=threads)
    sizes = sorted({len(g) for g in batched.groups}, reverse=True)
    return alone.seconds, batched.seconds, ",".join(map(str, sizes)), _shares(points, costs)


def _measure(part: BatteryPart, workers: int, threads: int, members: int | None) -> float:
    """Wall seconds of training the part from an empty store (its preflight included)."""
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "b.db") as store:
        backend = make_backend(
            "local", points=len(part.plan.points), workers=workers, threads=threads
        )
        start = time.perf_counter()
        run_experiment(part.config, store, backend=backend, members=members)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="quick", choices=("quick", "full"))
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1")
    parser.add_argument("--only", nargs="+", choices=BATTERY, default=list(BATTERY))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", action="store_true", help="train every preset twice")
    args = parser.parse_args()
    console = Console(width=200)
    overrides = {"seeds": args.seeds} if args.seeds else {}
    table = Table(
        title=f"battery at {args.size} size{f', {args.seeds} seeds' if args.seeds else ''}: "
        f"training minutes, {args.workers} workers x {args.threads} thread "
        f"({os.cpu_count()} cores; load {os.getloadavg()[0]:.1f} at the start)"
    )
    cols = ("preset", "points", "steps", "evals", "records", "ICS", "smooth")
    cols += ("est. alone", "est. batched", "K", "est. ratio")
    for col in cols:
        table.add_column(col, justify="left" if col in ("preset", "K") else "right")
    if args.measure:
        for col in ("alone", "batched", "ratio"):
            table.add_column(col, justify="right")
    totals = [0.0, 0.0, 0.0, 0.0]
    with tempfile.TemporaryDirectory() as tmp:
        parts = plan_battery(args.size, Path(tmp) / "empty.db", args.only, overrides)
    for part in parts:
        alone, batched, sizes, shares = _estimates(part, args.workers, args.threads)
        whole = sum(shares) or 1.0
        row = [part.preset, str(len(part.plan.points))]
        row += [f"{100 * v / whole:.0f}%" for v in shares]
        row += [_minutes(alone), _minutes(batched), sizes, _ratio(alone, batched)]
        totals[0] += alone
        totals[1] += batched
        if args.measure:
            took_alone = _measure(part, args.workers, args.threads, 1)
            took_batched = _measure(part, args.workers, args.threads, None)
            totals[2] += took_alone
            totals[3] += took_batched
            row += [_minutes(took_alone), _minutes(took_batched), _ratio(took_alone, took_batched)]
        table.add_row(*row)
        console.print(f"done {part.preset}", style="dim")
    last = [
        "all",
        "",
        "",
        "",
        "",
        "",
        "",
        _minutes(totals[0]),
        _minutes(totals[1]),
        "",
        _ratio(*totals[:2]),
    ]
    if args.measure:
        last += [_minutes(totals[2]), _minutes(totals[3]), _ratio(*totals[2:])]
    table.add_row(*last, style="bold")
    console.print(table)
    console.print(f"load average at the end: {os.getloadavg()[0]:.1f}", style="dim")


if __name__ == "__main__":
    main()
