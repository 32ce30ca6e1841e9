"""Where the battery's time goes: per preset, the share of its points' time spent in
training steps, evaluations, probe records and the Santurkar measurements.

The costs are the preflight's own measurements (median blocks of real training steps,
one evaluation, one probe record, one gradient-ICS and one smoothness measurement per
distinct architecture, at the thread count a pool worker gets), multiplied out over
each point's schedule. Run on a quiet machine:

    python benchmarks/battery_costs.py --size quick
    python benchmarks/battery_costs.py --size full --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from covshift.experiments.battery import BATTERY, plan_battery
from covshift.experiments.preflight import estimate_seconds, format_seconds, preflight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="quick", choices=("quick", "full"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point")
    parser.add_argument("--workers", type=int, default=2, help="lanes of the estimate")
    args = parser.parse_args()
    table = Table(title=f"battery ({args.size}): where the points' time goes")
    for col in ("preset", "points", "steps", "evals", "records", "ICS", "smooth", "estimate"):
        table.add_column(col, justify="left" if col == "preset" else "right")
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        parts = plan_battery(args.size, Path(tmp) / "c.db", BATTERY)
        for part in parts:
            points = part.plan.to_run
            costs = preflight(part.config, points, args.threads)
            shares = {"steps": 0.0, "evals": 0.0, "records": 0.0, "ics": 0.0, "smooth": 0.0}
            for p in points:
                c, s, pr = costs[p.id], p.spec, p.spec.probe
                records = (s.steps // pr.every + 1) * (2 if pr.mode == "both" else 1)
                records += 2 if pr.noise_floor else 0
                shares["steps"] += s.steps * c.step
                shares["evals"] += (s.steps // s.eval_every + 2) * c.evaluation
                shares["records"] += records * c.record
                if pr.gradient_ics_every:
                    shares["ics"] += (s.steps // pr.gradient_ics_every + 1) * c.gradient_ics
                if pr.smoothness_every:
                    shares["smooth"] += (s.steps // pr.smoothness_every + 1) * c.smoothness
            whole = sum(shares.values()) or 1.0
            seconds = estimate_seconds(points, costs, args.workers)
            total += seconds
            table.add_row(
                part.preset,
                str(len(points)),
                *(f"{100 * v / whole:.0f}%" for v in shares.values()),
                format_seconds(seconds),
            )
    Console().print(table)
    print(
        f"total estimate on {args.workers} workers x {args.threads} thread(s): "
        f"{format_seconds(total)}"
    )


if __name__ == "__main__":
    main()
