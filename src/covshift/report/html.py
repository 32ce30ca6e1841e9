"""The experiment report: a self-contained ``index.html`` (figures embedded) beside
``claims.html``, ``claims.json``, ``points.csv``, ``summary.json`` and the figure
files, with the settings, the grid, the choices the paper left open, the headline
numbers (mean and standard deviation over seeds) and the verdict on each claim."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from covshift.experiments.config import ExperimentConfig, ModelSpec, OptimizerSpec
from covshift.experiments.experiment_summary import json_safe, unfinished_note, write_points_csv
from covshift.experiments.grid import format_axes
from covshift.report.claims_page import CLAIMS_CSS, claims_table_html, write_claims
from covshift.report.figures import experiment_figure, percentile_panels, save_figure
from covshift.store import Store

__all__ = ["write_report"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _mean_sd(mean: float | None, sd: float | None, digits: int) -> str:
    if mean is None:
        return "&ndash;"
    return f"{mean:.{digits}f}" + (f" &plusmn; {sd:.{digits}f}" if sd is not None else "")


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell_name(config: ExperimentConfig, cell: dict[str, Any]) -> str:
    axes = format_axes(cell["axes"])
    return html.escape(config.networks[cell["network"]].label + (f" ({axes})" if axes else ""))


def _network_text(m: ModelSpec) -> str:
    if m.kind == "transformer":
        return (
            f"decoder-only transformer, {m.depth} blocks, d_model {m.width}, {m.heads} "
            f"heads, context {m.context}, MLP {m.mlp_ratio} x d_model (GELU), "
            f"{m.norm_position}-norm"
        )
    return (
        f"{m.kind.upper()} {m.depth} x {m.width} {m.activation}, norm "
        f"{m.norm_position} the activation"
    )


def _optimizer_text(o: OptimizerSpec) -> str:
    warmup = f", linear warm-up over {o.warmup_steps} steps" if o.warmup_steps else ""
    if o.decay == "cosine":
        warmup += ", cosine decay to 0 over the run"
    if o.kind == "adamw":
        return (
            f"AdamW, lr {o.lr:g}, betas ({o.betas[0]:g}, {o.betas[1]:g}), "
            f"weight decay {o.weight_decay:g}{warmup}"
        )
    return f"SGD, lr {o.lr:g}, momentum {o.momentum:g}, weight decay {o.weight_decay:g}{warmup}"


def _settings_rows(config: ExperimentConfig) -> list[list[str]]:
    m, o, p = config.model, config.optimizer, config.probe
    rows = [
        ("dataset", config.dataset + (f" ({config.data_dir})" if config.data_dir else "")),
        ("network", _network_text(m)),
        (
            "networks",
            "; ".join(f"{n.label}: norm = {n.resolve(m).norm}" for n in config.networks.values()),
        ),
        ("steps, batch size", f"{config.steps:,}, {config.batch_size}"),
        ("optimizer", _optimizer_text(o)),
        ("initialization", f"{m.init}" + (f", std {m.init_std:g}" if m.init == "gaussian" else "")),
        ("norm settings", ", ".join(f"{k} = {v}" for k, v in m.norm_kwargs.items()) or "defaults"),
        (
            "probe",
            f"{', '.join(p.layers)} ({p.record}), every {p.every} steps, on the first "
            f"{p.examples} test examples, quantiles {', '.join(f'{q:g}' for q in p.quantiles)}",
        ),
        ("evaluation", f"full test set every {config.eval_every} steps"),
        ("seeds", ", ".join(str(s) for s in config.seeds)),
        (
            "sweep",
            "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in config.sweep.items()) or "none",
        ),
        (
            "divergence",
            f"loss not finite or above {config.divergence.factor:g} x the initial test loss "
            f"at an evaluation ({'stops' if config.divergence.stop else 'goes on'})",
        ),
    ]
    return [[html.escape(k), html.escape(v)] for k, v in rows]


def _unit_axes(store: Store, summary: dict[str, Any], layers: list[str]) -> dict[str, str]:
    """Layer -> "axis k (source)" of its last record in the first run recording it
    (HTML, with the rule as a tooltip); layers recorded before schema 3 are left out."""
    found: dict[str, str] = {}
    for row in summary["points"]:
        run_id = row.get("run_id")
        if run_id is None:
            continue
        for layer in layers:
            if layer in found:
                continue
            recorded = store.probe_units(run_id, layer)
            last = recorded[-1] if recorded else None
            if last is not None and last.dim is not None:
                found[layer] = (
                    f'<span title="{html.escape(last.rule or "")}">axis {last.dim} '
                    f"({html.escape(last.source or '')})</span>"
                )
        if len(found) == len(layers):
            break
    return found


def write_report(
    store: Store,
    experiment_id: str,
    config: ExperimentConfig,
    summary: dict[str, Any],
    out_dir: Path,
) -> Path:
    """Write the report files (see the module docstring) into ``out_dir``; returns the
    path of ``index.html``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = experiment_figure(store, experiment_id, config, summary)
    png, svg = save_figure(fig, out_dir, "figure")
    (out_dir / "summary.json").write_text(
        json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n"
    )
    write_points_csv(summary, out_dir / "points.csv")
    write_claims(summary["claims"], config, experiment_id, out_dir)
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    cells = summary["cells"]
    n_seeds = len(config.seeds)

    checkpoints = [str(c) for c in config.report.checkpoints] + ["final"]
    acc_rows = [
        [_cell_name(config, c)]
        + [
            _mean_sd(c["test_accuracy"].get(k), c["test_accuracy_sd"].get(k), 4)
            for k in checkpoints
        ]
        + [_fmt(c["final_step"]), html.escape(_status_text(c["status"]))]
        for c in cells
    ]
    layers: list[str] = []
    for c in cells:
        layers += [x for x in c["drift"] if x not in layers]
    units = _unit_axes(store, summary, layers)
    drift_rows = [
        [html.escape(layer), units.get(layer, "&ndash;")]
        + [_mean_sd(c["drift"].get(layer), c["drift_sd"].get(layer), 3) for c in cells]
        for layer in layers
    ]
    how = (
        " (fixed by report.unit)"
        if config.report.unit is not None
        else " (the unit with the median drift of its layer)"
    )
    panels = [] if config.sweep else percentile_panels(store, experiment_id, config, summary)
    panel_notes = "".join(
        f"<li>{html.escape(p.label)}: layer <code>{html.escape(p.layer)}</code>, "
        f"unit {p.unit}{how}</li>"
        for p in panels
    )
    choices = [[html.escape(k), html.escape(v)] for k, v in config.choices.items()]
    run_rows = [
        [
            html.escape(r["label"]),
            html.escape(format_axes(r["axes"])) or "&ndash;",
            _fmt(r["seed"]),
            f"<code>{r['point']}</code>",
            _fmt(r["run_id"]),
            html.escape(r["status"])
            + (f" at step {r['diverged_at']}" if r["diverged_at"] is not None else ""),
        ]
        for r in summary["points"]
    ]
    seeds = f"{n_seeds} seed{'s' * (n_seeds > 1)}"
    note = unfinished_note(summary, experiment_id, store.path)
    warning = f'<p class="warning">{html.escape(note)}</p>\n' if note else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(config.title)}</title><style>{CLAIMS_CSS}</style></head><body>
<h1>{html.escape(config.title)}</h1>
<p>{html.escape(config.description)}</p>
<p>Experiment <code>{html.escape(experiment_id)}</code>, store <code>{
        html.escape(str(store.path))
    }</code>: {summary["grid"]["points"]} points ({len(config.networks)} networks
{
        "x " + " x ".join(f"{len(v)} {html.escape(k)}" for k, v in config.sweep.items()) + " "
        if config.sweep
        else ""
    }x {seeds}).</p>
{warning}<h2>Claims</h2>
<p>Each claim's statistic is computed per seed and judged by the rule its preset wrote
down before the run: the details, figures and rules are in
<a href="claims.html">claims.html</a> (numbers in <a href="claims.json">claims.json</a>).</p>
{claims_table_html(summary["claims"], link="claims.html")}
<h2>Figure</h2>
<img alt="experiment figure" src="data:image/png;base64,{image}">
<p>Files: <a href="{png.name}">{png.name}</a>, <a href="{svg.name}">{svg.name}</a>,
<a href="summary.json">summary.json</a>, <a href="points.csv">points.csv</a> (one row per
point).{" Percentile panels:" if panel_notes else ""}</p><ul>{panel_notes}</ul>
<h2>Test accuracy (mean &plusmn; sd over {seeds})</h2>
{
        _table(
            ["network"]
            + [f"step {c}" if c != "final" else "at the last step" for c in checkpoints]
            + ["last step", "runs"],
            acc_rows,
        )
    }
<h2>Drift per layer (mean &plusmn; sd over {seeds})</h2>
<p>Drift of a layer = mean over units of the displacement of the unit's recorded
quantiles between the first and the last record, in units of the unit's typical
15&ndash;85 width (docs/probe.md). 0 means no movement; 1 means the distribution moved by
one typical width. Units: the axis of the layer's values that holds its units, in the
first run that recorded the layer, and how it was found (hover for why; docs/probe.md).</p>
{_table(["layer", "units"] + [_cell_name(config, c) for c in cells], drift_rows, 2)}
<h2>Settings</h2>
{_table(["setting", "value"], _settings_rows(config), numeric_from=99)}
<h2>Choices the paper leaves open</h2>
{_table(["setting", "choice and why"], choices, numeric_from=99)}
<h2>Points</h2>
{_table(["network", "axes", "seed", "point", "run id", "status"], run_rows, numeric_from=99)}
</body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page)
    return index


def _status_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())
