"""A preset run batched (the planner's members) and one point at a time (``--members
1``), one after the other from empty stores: the wall-time ratio, and every claim's
estimate and verdict side by side, each difference as a share of the claim's 95%
interval width (the docs take a claim as equal below a tenth of it), and how many
points end with bitwise equal final accuracies.

    python benchmarks/members_parity.py depth --size quick --seeds 10
    python benchmarks/members_parity.py ioffe2015 --size quick --seeds 5 --workers 2

Run on a quiet machine: the wall times of a busy one are noise (the ratio less so,
the two runs being back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _run(preset: str, args: argparse.Namespace, members: str | None, where: Path) -> tuple:
    command = [sys.executable, "-m", "covshift.cli", "run", preset, "--size", args.size]
    command += ["--db", str(where / "c.db"), "--out", str(where / "report"), "--json", "-q"]
    if args.seeds:
        command += ["--seeds", str(args.seeds)]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if members:
        command += ["--members", members]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return took, json.loads(done.stdout)


def _width(claim: dict[str, Any]) -> float | None:
    low, high = (claim.get("interval") or [None, None])[:2]
    return None if low is None or high is None else high - low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--size", default="quick")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    console = Console(width=200)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "b").mkdir()
        (Path(tmp) / "a").mkdir()
        batched_s, batched = _run(args.preset, args, None, Path(tmp) / "b")
        alone_s, alone = _run(args.preset, args, "1", Path(tmp) / "a")
    table = Table(
        title=f"{args.preset} at {args.size} size: wall {alone_s:.0f} s one at a time, "
        f"{batched_s:.0f} s batched, {alone_s / batched_s:.2f}x (load {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after)"
    )
    for col in ("claim", "slice", "--members 1", "batched", "|diff| / width", "verdicts"):
        table.add_column(col, justify="left" if col in ("claim", "slice") else "right")
    worst = 0.0
    for a, b in zip(alone["claims"], batched["claims"], strict=True):
        ea, eb, width = a["estimate"], b["estimate"], _width(a)
        share = "-"
        if ea is not None and eb is not None:
            if width:
                worst = max(worst, abs(eb - ea) / width)
                share = f"{abs(eb - ea) / width:.4f}"
            elif ea != eb:
                share = "differs (no width)"
        table.add_row(
            a["id"],
            a.get("slice_text", ""),
            f"{ea:.6g}" if ea is not None else "-",
            f"{eb:.6g}" if eb is not None else "-",
            share,
            f"{a['verdict']} / {b['verdict']}",
        )
    console.print(table)
    finals = {p["point"]: p["test_accuracy"]["final"] for p in alone["points"]}
    same = sum(finals[p["point"]] == p["test_accuracy"]["final"] for p in batched["points"])
    gaps = [
        abs(finals[p["point"]] - p["test_accuracy"]["final"])
        for p in batched["points"]
        if finals[p["point"]] is not None and p["test_accuracy"]["final"] is not None
    ]
    console.print(
        f"largest |diff| / interval width {worst:.4f}; final accuracy equal in {same} of "
        f"{len(finals)} points, largest gap {max(gaps, default=0.0):.4f}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
