#!/usr/bin/env python
"""The wall time a battery (or any set of experiments) spent training, from its store.

    python scripts/battery_time.py STORE --claims REPORT/claims.json [--gap MINUTES]
    python scripts/battery_time.py STORE --experiment ID [--experiment ID ...]

Every run row records when the run started and when it ended. A run that was
interrupted and resumed later (a long battery stopped at the end of one working
session and resumed in the next) keeps its first start, so its span covers the pause,
and a sum or a union of spans would count the pause as training. So the time here is

    busy = | union of the runs' [started, ended] |  -  idle gaps

where an idle gap is a stretch of at least ``--gap`` minutes (default 20) inside that
union in which no selected run started or ended. A battery's points end every few
minutes while it trains (with two workers, at least one point ends within the longest
point's duration), so such a stretch is a pause; choose ``--gap`` above the longest
point's duration (the output names the longest span among the runs that hold no gap,
so that a too-small ``--gap`` shows). Runs without an end (still running, or left
``running`` by a killed process) are counted and left out.

The experiments are those of a battery page's ``claims.json`` (``presets[].experiment``,
reported per preset) or those given with ``--experiment``. Points shared between
experiments (the same point identity) are counted once per experiment that reads them.

Run from the repository root; reads the store read-only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

Span = tuple[float, float]  # (started, ended), seconds since the epoch


@dataclass(frozen=True)
class BusyTime:
    """What :func:`busy_time` found for one set of runs (seconds)."""

    runs: int
    open_runs: int
    union: float
    gaps: list[Span]
    longest_run: float

    @property
    def seconds(self) -> float:
        return self.union - sum(end - start for start, end in self.gaps)


def _union(spans: Sequence[Span]) -> list[Span]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def busy_time(spans: Sequence[Span | None], gap: float) -> BusyTime:
    """The union of ``spans`` minus the idle gaps of at least ``gap`` seconds (see the
    module docstring); a None span is a run without an end."""
    closed = [s for s in spans if s is not None]
    union = _union(closed)
    events = sorted({t for span in closed for t in span})
    gaps: list[Span] = []
    for before, after in itertools.pairwise(events):
        if after - before >= gap and any(a <= before and after <= b for a, b in union):
            gaps.append((before, after))
    longest = max(
        (
            end - start
            for start, end in closed
            if not any(start <= g0 and g1 <= end for g0, g1 in gaps)
        ),
        default=0.0,
    )
    return BusyTime(
        runs=len(closed),
        open_runs=len(spans) - len(closed),
        union=sum(b - a for a, b in union),
        gaps=gaps,
        longest_run=longest,
    )


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def experiment_spans(con: sqlite3.Connection, experiment: str) -> list[Span | None]:
    """The span of every run of the experiment's points (None: the run has not ended)."""
    rows = con.execute(
        "SELECT r.started_at, r.ended_at FROM experiment_points ep "
        "JOIN runs r ON r.point = ep.point WHERE ep.experiment = ?",
        (experiment,),
    ).fetchall()
    return [None if end is None else (_seconds(start), _seconds(end)) for start, end in rows]


def _experiments(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, experiment id) pairs from --claims or --experiment."""
    if args.claims is not None:
        try:
            page = json.loads(Path(args.claims).read_text())
            return [(p["preset"], p["experiment"]) for p in page["presets"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(
                f"{args.claims}: not a battery page's claims.json with presets[].preset and "
                f"presets[].experiment ({error})"
            ) from None
    return [(e, e) for e in args.experiment]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--claims", type=Path, help="a battery page's claims.json")
    chosen.add_argument("--experiment", action="append", help="an experiment id")
    parser.add_argument("--gap", type=float, default=20.0, help="idle gap, minutes")
    args = parser.parse_args(argv)
    if args.gap <= 0:
        raise SystemExit(f"--gap must be a positive number of minutes, got {args.gap}")
    if not args.store.is_file():
        raise SystemExit(f"{args.store}: no such store")
    con = sqlite3.connect(f"file:{args.store}?mode=ro", uri=True)
    try:
        everything: list[Span | None] = []
        print(
            "| preset | runs | not ended | busy (min) | union of spans (min) | pauses "
            "| longest run (min) |"
        )
        print("|---|---|---|---|---|---|---|")
        for label, experiment in _experiments(args):
            spans = experiment_spans(con, experiment)
            if not spans:
                raise SystemExit(f"{args.store}: no runs of experiment {experiment!r}")
            everything += spans
            found = busy_time(spans, args.gap * 60)
            print(
                f"| `{label}` | {found.runs} | {found.open_runs} | {_minutes(found.seconds)} | "
                f"{_minutes(found.union)} | {len(found.gaps)} | {_minutes(found.longest_run)} |"
            )
        total = busy_time(everything, args.gap * 60)
        print(
            f"| **all** | {total.runs} | {total.open_runs} | {_minutes(total.seconds)} | "
            f"{_minutes(total.union)} | {len(total.gaps)} | {_minutes(total.longest_run)} |"
        )
    finally:
        con.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
