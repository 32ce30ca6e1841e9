"""The HTML report: one self-contained ``index.html`` (figure embedded) beside the
figure files, with the settings, the choices the paper left open, the headline
numbers and the verdict on each claim."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from covshift.experiments.config import ExperimentConfig
from covshift.report.figures import experiment_figure, percentile_panels, save_figure
from covshift.store import Store

__all__ = ["write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222;
       line-height: 1.45; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.holds { color: #1a7f37; font-weight: 600; }
.does-not-hold { color: #b42318; font-weight: 600; }
.not-measured { color: #777; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


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


def _settings_rows(config: ExperimentConfig) -> list[list[str]]:
    m, o, p = config.model, config.optimizer, config.probe
    rows = [
        ("dataset", config.dataset + (f" ({config.data_dir})" if config.data_dir else "")),
        (
            "network",
            f"{m.kind.upper()} {m.depth} x {m.width} {m.activation}, norm "
            f"{m.norm_position} the activation",
        ),
        (
            "networks",
            "; ".join(f"{n.label}: norm = {n.resolve(m).norm}" for n in config.networks.values()),
        ),
        ("steps, batch size", f"{config.steps:,}, {config.batch_size}"),
        (
            "optimizer",
            f"SGD, lr {o.lr:g}, momentum {o.momentum:g}, weight decay {o.weight_decay:g}",
        ),
        ("initialization", f"{m.init}" + (f", std {m.init_std:g}" if m.init == "gaussian" else "")),
        ("norm settings", ", ".join(f"{k} = {v}" for k, v in m.norm_kwargs.items()) or "defaults"),
        (
            "probe",
            f"{', '.join(p.layers)} ({p.record}), every {p.every} steps, on the first "
            f"{p.examples} test examples, quantiles {', '.join(f'{q:g}' for q in p.quantiles)}",
        ),
        ("evaluation", f"full test set every {config.eval_every} steps"),
        ("seed", str(config.seed)),
    ]
    return [[html.escape(k), html.escape(v)] for k, v in rows]


def write_report(
    store: Store,
    experiment_id: str,
    config: ExperimentConfig,
    summary: dict[str, Any],
    out_dir: Path,
) -> Path:
    """Write ``figure.png``, ``figure.svg``, ``summary.json`` and ``index.html`` into
    ``out_dir``; returns the path of ``index.html``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = experiment_figure(store, experiment_id, config, summary)
    png, svg = save_figure(fig, out_dir, "figure")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    nets = summary["networks"]

    checkpoints = [str(c) for c in config.report.checkpoints] + ["final"]
    acc_rows = [
        [html.escape(n["label"])]
        + [_fmt((n.get("test_accuracy") or {}).get(c)) for c in checkpoints]
        + [_fmt(n.get("final_step"))]
        for n in nets.values()
    ]
    layers: list[str] = []
    for n in nets.values():
        layers += [x for x in (n.get("drift") or {}) if x not in layers]
    drift_rows = [
        [html.escape(layer)] + [_fmt((n.get("drift") or {}).get(layer), 3) for n in nets.values()]
        for layer in layers
    ]
    claim_rows = []
    for c in summary["claims"]:
        css = c["verdict"].replace(" ", "-")
        values = ", ".join(
            f"{html.escape(config.networks[k].label)}: {_fmt(v)}" for k, v in c["values"].items()
        )
        claim_rows.append(
            [
                html.escape(c["text"]),
                f"<code>{html.escape(c['metric'])}</code>",
                values,
                f'<span class="{css}">{c["verdict"]}</span>',
            ]
        )
    how = (
        " (fixed by report.unit)"
        if config.report.unit is not None
        else " (the unit with the median drift of its layer)"
    )
    panel_notes = "".join(
        f"<li>{html.escape(p.label)}: layer <code>{html.escape(p.layer)}</code>, "
        f"unit {p.unit}{how}</li>"
        for p in percentile_panels(store, experiment_id, config)
    )
    choices = [[html.escape(k), html.escape(v)] for k, v in config.choices.items()]
    run_rows = [
        [html.escape(n["label"]), _fmt(n.get("run_id")), html.escape(n["status"])]
        for n in nets.values()
    ]

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(config.title)}</title><style>{_CSS}</style></head><body>
<h1>{html.escape(config.title)}</h1>
<p>{html.escape(config.description)}</p>
<p>Experiment <code>{html.escape(experiment_id)}</code>, store <code>{
        html.escape(str(store.path))
    }</code>.</p>
<h2>Claims</h2>
{_table(["claim", "metric", "values", "verdict"], claim_rows, numeric_from=99)}
<h2>Figure</h2>
<img alt="experiment figure" src="data:image/png;base64,{image}">
<p>Files: <a href="{png.name}">{png.name}</a>, <a href="{svg.name}">{svg.name}</a>,
<a href="summary.json">summary.json</a>. Percentile panels:</p><ul>{panel_notes}</ul>
<h2>Test accuracy</h2>
{
        _table(
            ["network"]
            + [f"step {c}" if c != "final" else "at the last step" for c in checkpoints]
            + ["last step"],
            acc_rows,
        )
    }
<h2>Drift per layer</h2>
<p>Drift of a layer = mean over units of the displacement of the unit's recorded
quantiles between the first and the last record, in units of the unit's typical
15&ndash;85 width (docs/probe.md). 0 means no movement; 1 means the distribution moved by
one typical width.</p>
{_table(["layer"] + [html.escape(n["label"]) for n in nets.values()], drift_rows)}
<h2>Settings</h2>
{_table(["setting", "value"], _settings_rows(config), numeric_from=99)}
<h2>Choices the paper leaves open</h2>
{_table(["setting", "choice and why"], choices, numeric_from=99)}
<h2>Runs</h2>
{_table(["network", "run id", "status"], run_rows, numeric_from=99)}
</body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page)
    return index
