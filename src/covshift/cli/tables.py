"""The terminal tables of the command line (rich): numbers, claims, points, runs."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from covshift.experiments.claim_result import verdict_p_adjusted
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import format_axes
from covshift.experiments.scale_check import scales_disagree
from covshift.experiments.sweep import SweepPlan

__all__ = ["claims_table", "plan_table", "summary_table"]

_VERDICT_STYLE = {
    "supported": "green",
    "pass": "green",
    "contradicted": "red",
    "fail": "red",
    "inconclusive": "yellow",
    "not interpretable": "magenta",
    "not measurable": "dim",
    "not measured": "dim",
}
_WIDE = 6  # more cells than this: one row per cell instead of one column


def _mean_sd(mean: float | None, sd: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _cell_name(config: ExperimentConfig, cell: dict[str, Any]) -> str:
    axes = format_axes(cell["axes"])
    return config.networks[cell["network"]].label + (f" ({axes})" if axes else "")


def summary_table(summary: dict[str, Any], config: ExperimentConfig) -> Table:
    """Headline numbers per cell, mean ± sd over seeds."""
    cells = summary["cells"]
    n = len(config.seeds)
    title = f"{summary['experiment']}: headline numbers (mean ± sd over {n} seed{'s' * (n > 1)})"
    checkpoints = [str(c) for c in config.report.checkpoints] + ["final"]
    layers: list[str] = []
    for c in cells:
        layers += [x for x in c["drift"] if x not in layers]
    rows: list[tuple[str, list[str]]] = []
    for k in checkpoints:
        name = f"test accuracy at step {k}" if k != "final" else "test accuracy, last step"
        rows.append(
            (
                name,
                [
                    _mean_sd(c["test_accuracy"].get(k), c["test_accuracy_sd"].get(k), 4)
                    for c in cells
                ],
            )
        )
    for layer in layers:
        rows.append(
            (
                f"drift {layer}",
                [_mean_sd(c["drift"].get(layer), c["drift_sd"].get(layer), 3) for c in cells],
            )
        )
    rows.append(("runs", [", ".join(f"{v} {s}" for s, v in c["status"].items()) for c in cells]))
    table = Table(title=title)
    if len(cells) <= _WIDE:
        table.add_column("number")
        for c in cells:
            table.add_column(_cell_name(config, c), justify="right")
        for name, values in rows:
            table.add_row(name, *values)
        return table
    table.add_column("network")
    for name, _ in rows:
        table.add_column(name, justify="right")
    for i, c in enumerate(cells):
        table.add_row(_cell_name(config, c), *[values[i] for _, values in rows])
    return table


def claims_table(summary: dict[str, Any]) -> Table:
    """One row per hypothesis (and slice): estimate, 95% interval, seeds, adjusted p,
    verdict; then the checks, apart (they are controls, not findings)."""
    claims = summary["claims"]
    method = next((c["adjust_method"] for c in claims if c.get("adjust_method")), None)
    table = Table(
        title="claims (95% interval over seeds; rules in the preset; "
        + (f"p {method}-adjusted over the hypotheses)" if method else "no hypotheses)")
    )
    table.add_column("claim")
    table.add_column("estimate", justify="right")
    table.add_column("95% interval", justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("p (adj.)", justify="right")
    table.add_column("verdict")
    ordered = [c for c in claims if c.get("kind") != "check"]
    checks = [c for c in claims if c.get("kind") == "check"]
    for c in [*ordered, *checks]:
        where = f" [{c['slice_text']}]" if c["slice_text"] else ""
        interval = f"[{c['interval'][0]:.4g}, {c['interval'][1]:.4g}]" if c["interval"] else "-"
        estimate = f"{c['estimate']:.4g}" if c["estimate"] is not None else "-"
        adjusted = verdict_p_adjusted(c)
        p = f"{adjusted:.2g}" if adjusted is not None else "-"
        style = _VERDICT_STYLE.get(c["verdict"], "")
        verdict = c["verdict"] + (": one seed" if c["reason"].startswith("one seed") else "")
        if c.get("censored", {}).get("censored"):
            verdict += " (censored)"
        if scales_disagree(c):
            verdict += " (scales disagree)"
        kind = "check: " if c.get("kind") == "check" else ""
        table.add_row(
            f"{kind}{c['id']}{where}: {c['text']}",
            estimate,
            interval,
            f"{c['seeds']}/{c['seeds_total']}",
            p,
            f"[{style}]{verdict}[/]",
        )
    return table


def plan_table(plan: SweepPlan) -> Table:
    """Every point of a grid with what the store holds of it (``--dry-run``)."""
    table = Table(title=f"{plan.experiment_id}: {len(plan.points)} points")
    for col in ("#", "point", "network", "axes", "seed", "in the store"):
        table.add_column(col, justify="right" if col in ("#", "seed") else "left")
    for p in plan.points:
        run = plan.recorded.get(p.id)
        status = "-" if run is None else f"{run.status} (run {run.id}, step {run.last_step})"
        table.add_row(
            str(p.position), p.id, p.network, format_axes(p.axes) or "-", str(p.seed), status
        )
    return table
