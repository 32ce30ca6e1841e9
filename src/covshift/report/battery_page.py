"""The battery's one report: ``claims.json`` and a self-contained ``claims.html``.

One section per preset (its claims, each with its text, operational reading,
statistic, rule, estimate, interval, verdict and figure, the figure being the one
the preset's own report drew from the same numbers), the attribution matrix of the
causes experiment, and the across-battery correlation claim with its scatter plot.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from covshift.experiments.claims import INTERVAL_METHOD
from covshift.experiments.summary import json_safe
from covshift.report.claims_page import CLAIMS_CSS, _section, _slug, claims_table_html
from covshift.report.figures import save_figure

__all__ = ["BatterySection", "write_battery"]

_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


class BatterySection:
    """What the page shows of one preset."""

    def __init__(
        self,
        preset: str,
        config: Any,
        experiment_id: str,
        claims: list[dict[str, Any]],
        report_dir: Path,
        matrix: dict[str, Any] | None = None,
    ) -> None:
        self.preset = preset
        self.config = config
        self.experiment_id = experiment_id
        self.claims = claims
        self.report_dir = report_dir
        self.matrix = matrix


def _image(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else ""


def _correlation_figure(result: dict[str, Any], out_dir: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    experiments = sorted({p["experiment"] for p in result["pairs"]})
    for i, name in enumerate(experiments):
        mine = [p for p in result["pairs"] if p["experiment"] == name]
        left.plot(
            [p["drift_reduction"] for p in mine],
            [p["speedup"] for p in mine],
            "o",
            ms=4,
            alpha=0.75,
            color=_COLORS[i % len(_COLORS)],
            label=name,
        )
    left.axhline(0, color="gray", lw=0.8)
    left.axvline(0, color="gray", lw=0.8)
    # Drifts of deep unnormalized networks span orders of magnitude (they are in units
    # of each unit's spread, which can be tiny); the statistic is rank-based anyway.
    left.set_xscale("symlog", linthresh=0.1)
    left.set_xlabel("drift reduction (no norm - norm), mean over layers (symlog)")
    left.set_ylabel("log2 speed-up to target")
    if experiments:
        left.legend(fontsize=7)
    values = list(result["per_seed"].values())
    right.plot(np.linspace(-0.08, 0.08, len(values)) if values else [], values, "o", color="#555")
    if result["interval"] is not None:
        lo, hi = result["interval"]
        est = result["estimate"]
        right.errorbar([0.25], [est], yerr=[[est - lo], [hi - est]], fmt="s", color="k", capsize=6)
    right.axhline(0, color="gray", ls="--", lw=1)
    right.set_xlim(-0.3, 0.55)
    right.set_xticks([])
    right.set_ylabel("Spearman correlation per seed")
    right.set_title(f"{result['verdict']} ({result['seeds']} of {result['seeds_total']} seeds)")
    left.grid(alpha=0.3)
    fig.suptitle("shift-vs-speed: drift reduction against speed-up, every (norm, no norm) pair")
    fig.tight_layout()
    png, _ = save_figure(fig, out_dir, "claim-shift-vs-speed")
    plt.close(fig)
    return png


def _matrix_html(matrix: dict[str, Any], out_dir: Path, stem: str) -> str:
    rows = np.array(
        [[np.nan if v is None else v for v in row] for row in matrix["share_removed"]], dtype=float
    )
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(matrix["layers"]), 1.2 + 0.5 * len(rows)))
    # Diverging: a negative share means the drift grew when those layers froze.
    image = ax.imshow(np.clip(rows, -1, 1), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(matrix["layers"])), [f"input of {x}" for x in matrix["layers"]])
    ax.set_yticks(range(len(rows)), matrix["labels"])
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            if np.isfinite(rows[i, j]):
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="share of drift removed (clipped to [-1, 1])")
    ax.set_title("1 - drift(frozen) / drift(all layers train), mean over seeds", fontsize=9)
    fig.tight_layout()
    png, _ = save_figure(fig, out_dir, stem)
    plt.close(fig)
    head = "".join(f"<th>{html.escape(x)}</th>" for x in matrix["layers"])
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        + "".join(f'<td class="num">{"&ndash;" if v is None else f"{v:.3f}"}</td>' for v in row)
        + "</tr>"
        for label, row in zip(matrix["labels"], matrix["share_removed"], strict=True)
    )
    return (
        "<h3>Attribution matrix</h3><p>Rows: the network trained with those layers frozen; "
        "columns: the layer whose input drift is measured. Each cell is the share of that "
        "drift which disappears when the row's layers do not train, mean over seeds; a "
        "negative share means the drift grew (the layers that still train moved more); an "
        "empty cell, a layer that does not drift in the reference network "
        f"(reference: <code>{html.escape(matrix['reference'])}</code>, nothing frozen).</p>"
        f"<table><tr><th>frozen</th>{head}</tr>{body}</table>"
        f'<img alt="attribution matrix" src="data:image/png;base64,{_image(png)}">'
    )


def write_battery(
    sections: Sequence[BatterySection],
    correlation: dict[str, Any],
    out_dir: Path,
    *,
    size: str,
) -> tuple[Path, Path]:
    """Write the battery's ``claims.json`` and ``claims.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    every = [c for s in sections for c in s.claims] + [correlation]
    parts_html = []
    for s in sections:
        body = []
        for claim in s.claims:
            png = s.report_dir / f"claim-{_slug(claim)}.png"
            claim["figure"] = str(png)
            body.append(_section(claim, s.config, _image(png)))
        matrix = _matrix_html(s.matrix, out_dir, f"matrix-{s.preset}") if s.matrix else ""
        report = s.report_dir / "index.html"
        parts_html.append(
            f'<h1 id="{html.escape(s.preset)}">{html.escape(s.preset)}: '
            f"{html.escape(s.config.title)}</h1>"
            f"<p>Experiment <code>{html.escape(s.experiment_id)}</code>, seeds "
            f"{', '.join(str(x) for x in s.config.seeds)}; its full report: "
            f'<a href="{html.escape(str(report))}">{html.escape(str(report))}</a>.</p>'
            f"<p>{html.escape(s.config.description)}</p>{matrix}{''.join(body)}"
        )
    png = _correlation_figure(correlation, out_dir)
    correlation["figure"] = str(png)
    corr_html = _section(correlation, None, _image(png))
    payload = {
        "size": size,
        "interval_method": INTERVAL_METHOD,
        "presets": [
            {
                "preset": s.preset,
                "experiment": s.experiment_id,
                "title": s.config.title,
                "seeds": list(s.config.seeds),
                "attribution_matrix": s.matrix,
            }
            for s in sections
        ],
        "claims": every,
    }
    json_path = out_dir / "claims.json"
    json_path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    counts: dict[str, int] = {}
    for c in every:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    tally = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>covshift battery ({html.escape(size)})</title><style>{CLAIMS_CSS}</style></head><body>
<h1>The textbook account of internal covariate shift, tested ({html.escape(size)} size)</h1>
<p>{len(every)} claim results: {html.escape(tally)}. Each statistic is computed once per
seed; the estimate is the {html.escape(INTERVAL_METHOD)}. Every rule was written in the
presets before the run. Numbers: <a href="claims.json">claims.json</a>.</p>
{claims_table_html(every, link="")}
{"".join(parts_html)}
<h1 id="battery">Across the battery</h1>
{corr_html}
</body></html>
"""
    html_path = out_dir / "claims.html"
    html_path.write_text(page)
    return json_path, html_path
