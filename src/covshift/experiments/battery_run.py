"""Running the battery into one store, and writing its one report.

:func:`run_battery` checks every preset that has points to run before anything is
written (the same preflight as ``covshift run``), prints the plan with its estimate,
then runs the presets one after another on one backend; :func:`report_battery`
writes each preset's own report and the battery's ``claims.html`` / ``claims.json``.
A second call with nothing missing only reads the store and writes the reports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from covshift.experiments.battery import (
    BatteryPart,
    attribution_matrix,
    battery_pairs,
    shift_speed_correlation,
)
from covshift.experiments.claim_result import ClaimResult
from covshift.experiments.claims import judge_claims
from covshift.experiments.costs import format_seconds
from covshift.experiments.experiment_summary import (
    load_experiment_numbers,
    summarize,
    unfinished_note,
)
from covshift.experiments.members import recorded_batches
from covshift.experiments.planner import MemberPlan, plan_members
from covshift.experiments.preflight import preflight
from covshift.experiments.preregistration import preregistration
from covshift.experiments.sweep import (
    make_backend,
    make_sweep_progress,
    record_experiment,
    run_sweep,
)
from covshift.experiments.verdicts import combine_slices, judge_family
from covshift.store import Store

__all__ = ["report_battery", "run_battery"]


def run_battery(
    parts: list[BatteryPart],
    store_path: str | Path,
    *,
    backend: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    console: Console | None = None,
    members: int | None = None,
) -> float:
    """Run every part's missing points; returns the seconds spent training.
    ``members``: points per batched model (None: the planner chooses per preset)."""
    console = console or Console()
    todo = [p for p in parts if p.plan.to_run]
    biggest = max((len(p.plan.to_run) for p in todo), default=1)
    chosen = make_backend(
        backend, points=biggest, workers=workers, threads=threads, address=address
    )
    lanes = chosen.workers or workers or 1
    table = Table(title=f"battery: {len(parts)} presets ({chosen.name} backend)")
    for col in ("preset", "experiment", "points", "to run", "estimate"):
        table.add_column(col, justify="right" if col in ("points", "to run") else "left")
    total = 0.0
    batches: dict[str, MemberPlan] = {}
    for part in parts:
        estimate = "-"
        if part.plan.to_run:
            costs = preflight(part.config, part.plan.to_run, chosen.threads)
            found = plan_members(
                part.plan.to_run,
                costs,
                lanes=lanes,
                threads=chosen.threads,
                members=members,
                resumed=recorded_batches(part.plan.to_run, part.plan.recorded, store_path),
            )
            batches[part.experiment_id] = found
            total += found.seconds
            estimate = f"{format_seconds(found.seconds)} ({len(found.groups)} batches)"
        table.add_row(
            part.preset,
            part.experiment_id,
            str(len(part.plan.points)),
            str(len(part.plan.to_run)),
            estimate,
        )
    console.print(table)
    console.print(f"estimated {format_seconds(total)} to run", highlight=False)
    if dry_run:
        return 0.0
    store = Store(store_path)
    try:
        for part in parts:  # the pre-registration record, before anything runs
            record_experiment(part.plan, store)
    finally:
        store.close()
    if not todo:
        return 0.0
    start = time.perf_counter()
    store = Store(store_path)
    try:
        for part in todo:
            with make_sweep_progress(disable=quiet, console=console) as progress:
                groups = batches[part.experiment_id].backend_groups
                run_sweep(part.plan, store, chosen, progress=progress, groups=groups)
    finally:
        store.close()
    return time.perf_counter() - start


def report_battery(
    parts: list[BatteryPart], store_path: str | Path, out_dir: Path, *, size: str
) -> tuple[list[dict[str, Any]], Path, list[str]]:
    """Each part's report (under ``out_dir/<experiment id>``, its claims adjusted over
    its own hypotheses) and the battery's page (every hypothesis adjusted over the whole
    battery); returns every claim result (the correlation claims last), the page, and
    per preset with runs that have not ended, what the pages say of them."""
    from covshift.report import write_report
    from covshift.report.battery_page import BatterySection, write_battery

    sections = []
    pairs: list[dict[str, Any]] = []
    seeds: list[int] = []
    results: list[ClaimResult] = []
    groups: list[str] = []
    records = []
    with Store(store_path, create=False) as store:
        for part in parts:
            config = part.config
            points, numbers = load_experiment_numbers(store, config)
            summary = summarize(store, part.experiment_id, config, (points, numbers))
            report_dir = out_dir / part.experiment_id
            write_report(store, part.experiment_id, config, summary, report_dir)
            pairs += battery_pairs(config, points, numbers)
            seeds += [s for s in config.seeds if s not in seeds]
            judged = judge_claims(config, part.experiment_id, points, numbers)
            for r in judged:
                r.extra["preset"] = part.preset
            results += judged
            groups += [part.preset] * len(judged)
            records.append(preregistration(store, config))
            sections.append(
                BatterySection(
                    part.preset,
                    config,
                    part.experiment_id,
                    judged,  # type: ignore[arg-type]  # JSON objects once judged below
                    report_dir,
                    attribution_matrix(config, points, numbers),
                    unfinished_note(
                        summary, part.experiment_id, store.path, "the same `covshift claims`"
                    ),
                )
            )
    correlation = shift_speed_correlation(pairs, seeds)
    for r in correlation:
        r.extra["preset"] = "battery"
    judge_family([*results, *correlation], [*groups, *(["battery"] * len(correlation))])
    for section in sections:
        section.claims = [r.to_json() for r in section.claims]  # type: ignore[union-attr]
    corr = [r.to_json() for r in correlation]
    combined = combine_slices(results)
    _, page = write_battery(
        sections, corr, out_dir, size=size, combined=combined, preregistration=records
    )
    notes = [f"{s.preset}: {s.unfinished}" for s in sections if s.unfinished]
    return [c for s in sections for c in s.claims] + corr, page, notes
