"""The claims battery's training minutes before batching (``--members 1``, every point
alone) and after (the planner's batches), estimated and, with ``--measure``, measured;
and where a point's time goes.

For each part of the battery at ``--size`` (its presets and the controls they borrow
from each other, as ``covshift claims`` plans them; ``--seeds``: seeds 0 .. N-1):

- ``steps`` .. ``set-up``: the share of the one-at-a-time estimate spent in training
  steps, evaluations (with their checkpoints), probe records, measurements (gradient
  ICS, smoothness, gradient norms, batch statistics) and building each network (the
  preflight's own measurements multiplied out over each point's schedule);
- ``est. alone`` / ``est. batched``: the preflight's estimate with ``--members 1`` and
  with the planner's choice, for ``--workers`` workers of ``--threads`` threads (what
  ``covshift claims --dry-run`` prints), and their ratio;
- ``floor``: the minutes the points' multiply-adds need at this machine's measured
  GEMM and 3x3-convolution throughput, spread perfectly over the workers (a lower
  bound on any schedule); ``x floor``: the batched estimate over it; ``max ratio``:
  the one-at-a-time estimate over it, the most any batching could gain;
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
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from covshift.experiments import run_experiment
from covshift.experiments.battery import BATTERY, BatteryPart, plan_battery
from covshift.experiments.planner import plan_members
from covshift.experiments.point import build_model, dataset_for
from covshift.experiments.preflight import preflight
from covshift.experiments.sweep import make_backend
from covshift.store import Store
from ensemble_speed import _conv_throughput, _gemm_throughput, _macs


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def _ratio(before: float | None, after: float | None) -> str:
    return "-" if not before or not after else f"{before / after:.1f}x"


# The parts of a point's estimate, each the preflight's Cost with only its fields kept.
_PARTS = {
    "steps": ("step",),
    "evals": ("evaluation", "checkpoint"),
    "records": ("record",),
    "measures": ("gradient_ics", "smoothness", "gradient_norm", "batch_stats"),
    "set-up": ("setup",),
}


def _shares(points: list, costs: dict) -> list[float]:
    """Seconds of the one-at-a-time estimate in each of :data:`_PARTS` (``Cost.of`` with
    every other field zeroed, so the split is the estimate's own arithmetic)."""
    shares = [0.0] * len(_PARTS)
    for p in points:
        cost = costs[p.id]
        zero = {f.name: 0.0 for f in dataclasses.fields(cost)}
        for i, kept in enumerate(_PARTS.values()):
            only = dataclasses.replace(cost, **{**zero, **{k: getattr(cost, k) for k in kept}})
            shares[i] += only.of(p)
    return shares


def _floor_seconds(points: list, gemm: float, conv: float) -> float:
    """The points' multiply-add floor: each training step's multiply-adds (forward,
    weight and input gradients; ensemble_speed's count of Linear and Conv2d layers) and
    each evaluation's forward ones at this machine's measured GEMM and 3x3-conv
    throughput. Attention's own products and every elementwise op are left out, so it
    is a lower bound on any schedule's time."""
    per_network: dict[str, tuple[float, float]] = {}
    total = 0.0
    for p in points:
        spec = p.spec
        key = spec.model.model_dump_json() + str(spec.batch_size)
        if key not in per_network:
            data = dataset_for(spec)
            model = build_model(spec.model, data, 0)
            linear, convs = _macs(model, data.x_train[: spec.batch_size])
            step = 2 * linear / gemm + 2 * convs / conv
            # forward alone is about a third of a step's multiply-adds, per example
            example = step / 3 / spec.batch_size
            per_network[key] = (step, example)
        step, example = per_network[key]
        tested = spec.test_examples or len(dataset_for(spec).x_test)
        total += spec.steps * step + (spec.steps // spec.eval_every + 2) * tested * example
    return total


def _estimates(
    part: BatteryPart, workers: int, threads: int, throughput: tuple[float, float]
) -> tuple[float, float, str, list, float]:
    """Seconds estimated alone and batched, the batch sizes the planner chose, the
    one-at-a-time seconds by part, and the floor's seconds on ``workers`` workers."""
    points = part.plan.to_run
    costs = preflight(part.config, points, threads)
    alone = plan_members(points, costs, lanes=workers, threads=threads, members=1)
    batched = plan_members(points, costs, lanes=workers, threads=threads)
    sizes = sorted({len(g) for g in batched.groups}, reverse=True)
    floor = _floor_seconds(points, *throughput) / workers
    return alone.seconds, batched.seconds, ",".join(map(str, sizes)), _shares(points, costs), floor


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
    cols = ("preset", "points", *_PARTS)
    cols += ("est. alone", "est. batched", "K", "est. ratio", "floor", "x floor", "max ratio")
    for col in cols:
        table.add_column(col, justify="left" if col in ("preset", "K") else "right")
    if args.measure:
        for col in ("alone", "batched", "ratio"):
            table.add_column(col, justify="right")
    torch.set_num_threads(args.threads)
    throughput = (_gemm_throughput(), _conv_throughput())
    totals = [0.0, 0.0, 0.0, 0.0, 0.0]
    with tempfile.TemporaryDirectory() as tmp:
        parts = plan_battery(args.size, Path(tmp) / "empty.db", args.only, overrides)
    for part in parts:
        alone, batched, sizes, shares, floor = _estimates(
            part, args.workers, args.threads, throughput
        )
        whole = sum(shares) or 1.0
        row = [part.preset, str(len(part.plan.points))]
        row += [f"{100 * v / whole:.0f}%" for v in shares]
        row += [_minutes(alone), _minutes(batched), sizes, _ratio(alone, batched)]
        row += [f"{floor / 60:.2f}", _ratio(batched, floor), _ratio(alone, floor)]
        totals[0] += alone
        totals[1] += batched
        totals[4] += floor
        if args.measure:
            took_alone = _measure(part, args.workers, args.threads, 1)
            took_batched = _measure(part, args.workers, args.threads, None)
            totals[2] += took_alone
            totals[3] += took_batched
            row += [_minutes(took_alone), _minutes(took_batched), _ratio(took_alone, took_batched)]
        table.add_row(*row)
        console.print(f"done {part.preset}", style="dim")
    last = ["all", "", *([""] * len(_PARTS)), _minutes(totals[0]), _minutes(totals[1]), ""]
    last += [_ratio(*totals[:2]), f"{totals[4] / 60:.2f}", _ratio(totals[1], totals[4])]
    last += [_ratio(totals[0], totals[4])]
    if args.measure:
        last += [_minutes(totals[2]), _minutes(totals[3]), _ratio(*totals[2:])]
    table.add_row(*last, style="bold")
    console.print(table)
    console.print(f"load average at the end: {os.getloadavg()[0]:.1f}", style="dim")


if __name__ == "__main__":
    main()
