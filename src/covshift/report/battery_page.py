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
from covshift.experiments.experiment_summary import json_safe
from covshift.experiments.significance import ALPHA
from covshift.report.claims_page import (
    CLAIMS_CSS,
    _num,
    _section,
    _slug,
    claims_table_html,
    fmt_interval,
)
from covshift.report.figures import save_figure
from covshift.report.forest import forest_plot

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
        unfinished: str | None = None,
    ) -> None:
        self.preset = preset
        self.config = config
        self.experiment_id = experiment_id
        self.claims = claims
        self.report_dir = report_dir
        self.matrix = matrix
        # What to say when some of the preset's runs have not ended (left out of
        # every number): experiment_summary.unfinished_note; None when all have.
        self.unfinished = unfinished


def _warning(text: str | None) -> str:
    return f'<p class="warning">{html.escape(text)}</p>' if text else ""


def _image(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else ""


def _correlation_figure(results: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    combined = results[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    pairs = combined["pairs"]
    experiments = sorted({p["experiment"] for p in pairs})
    for i, name in enumerate(experiments):
        color = _COLORS[i % len(_COLORS)]
        for trained in (True, False):
            mine = [
                p for p in pairs if p["experiment"] == name and (not any(p["censored"])) == trained
            ]
            left.plot(
                [p["drift_reduction"] for p in mine],
                [p["speedup"] for p in mine],
                "o",
                ms=4,
                alpha=0.8,
                color=color,
                mfc=color if trained else "none",
                label=name if trained else None,
            )
    left.axhline(0, color="gray", lw=0.8)
    left.axvline(0, color="gray", lw=0.8)
    # Drifts of deep unnormalized networks span orders of magnitude (they are in units
    # of each unit's spread, which can be tiny); the statistic is rank-based anyway.
    left.set_xscale("symlog", linthresh=0.1)
    left.set_xlabel("drift reduction (no norm - norm), mean over layers (symlog)")
    left.set_ylabel("log2 speed-up to target")
    left.set_title("filled: both networks train (primary); open: a side censored", fontsize=8)
    if experiments:
        left.legend(fontsize=7)
    names = [r["slice"]["preset"] for r in results]
    for y, r in enumerate(results):
        color = {"supported": "#1a7f37", "contradicted": "#b42318"}.get(r["verdict"], "#9a6700")
        if r["estimate"] is not None:
            right.plot([r["estimate"]], [y], "s" if y == 0 else "o", color=color)
        if r["interval"] is not None:
            right.plot(r["interval"], [y, y], color=color, lw=2)
    right.axvline(0, color="gray", ls="--", lw=1)
    right.set_yticks(range(len(results)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlim(-1.05, 1.05)
    right.set_xlabel("Spearman correlation (Fisher-combined for all presets)")
    right.set_title(f"combined: {combined['verdict']}", fontsize=9)
    left.grid(alpha=0.3)
    fig.suptitle("shift-vs-speed: drift reduction against speed-up, per preset")
    fig.tight_layout()
    png, _ = save_figure(fig, out_dir, "claim-shift-vs-speed")
    plt.close(fig)
    return png


def _checks_html(checks: Sequence[dict[str, Any]]) -> str:
    if not checks:
        return "<p>No checks.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(c['preset'])}</td><td>{html.escape(c['id'])}</td>"
        f'<td>{html.escape(c["text"])}</td><td class="num">{_num(c["estimate"])}</td>'
        f'<td class="num">{fmt_interval(c)}</td>'
        f'<td><span class="{"supported" if c["verdict"] == "pass" else "contradicted"}">'
        f"{html.escape(c['verdict'])}</span></td><td>{html.escape(c['reason'])}</td></tr>"
        for c in checks
    )
    return (
        "<table><tr><th>preset</th><th>check</th><th>what it checks</th><th>estimate</th>"
        f"<th>95% interval</th><th>result</th><th>why</th></tr>{rows}</table>"
    )


def _combined_html(combined: Sequence[dict[str, Any]]) -> str:
    if not combined:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(c['experiment'])}</td><td>{html.escape(c['id'])}</td>"
        f"<td>{html.escape(c['combined'])}</td></tr>"
        for c in combined
    )
    return (
        "<h2>Claims judged at several settings</h2><p>Where a claim is judged separately at "
        "each value of an axis, whether the settings agree:</p>"
        f"<table><tr><th>experiment</th><th>claim</th><th>over the settings</th></tr>{rows}"
        "</table>"
    )


def _prereg_html(records: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        changes = "; ".join(
            f"changed after results existed (earlier version {c['hash']}, recorded "
            f"{c['first_recorded']}): "
            + ", ".join(f"{d['id']} ({', '.join(d['fields'])})" for d in c["differences"])
            for c in r["changes"]
        )
        rows.append(
            f"<tr><td>{html.escape(r['preset'])}</td><td><code>{html.escape(r['hash'])}</code>"
            f"</td><td>{html.escape(str(r['first_recorded']))}</td><td>{r['claims']}</td>"
            f"<td>{html.escape(changes) or 'unchanged'}</td></tr>"
        )
    return (
        "<h2>Pre-registration</h2><p>Each preset's claims and rules are hashed; the store "
        "records when it first saw each version, before any point of it ran. A version "
        "changed after results existed is listed with what changed (docs/claims.md gives "
        "each change's date and reason).</p><table><tr><th>preset</th><th>claims hash</th>"
        f"<th>first recorded</th><th>claims</th><th>changes</th></tr>{''.join(rows)}</table>"
    )


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
    correlation: Sequence[dict[str, Any]],
    out_dir: Path,
    *,
    size: str,
    combined: Sequence[dict[str, Any]] = (),
    preregistration: Sequence[dict[str, Any]] = (),
) -> tuple[Path, Path]:
    """Write the battery's ``claims.json`` and ``claims.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    every = [c for s in sections for c in s.claims] + list(correlation)
    hypotheses = [c for c in every if c["kind"] == "hypothesis"]
    checks = [c for c in every if c["kind"] == "check"]
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
            f"<p>{html.escape(s.config.description)}</p>{_warning(s.unfinished)}"
            f"{matrix}{''.join(body)}"
        )
    corr_html = ""
    if correlation:
        png = _correlation_figure(correlation, out_dir)
        for c in correlation:
            c["figure"] = str(png)
        corr_html = "".join(
            _section(c, None, _image(png) if i == 0 else "") for i, c in enumerate(correlation)
        )
    forest = forest_plot(every, out_dir, "forest")
    family = next((c["family_size"] for c in hypotheses if c.get("family_size")), 0)
    payload = {
        "size": size,
        "interval_method": INTERVAL_METHOD,
        "alpha_one_sided": ALPHA,
        "adjust_method": "holm",
        "family_size": family,
        "presets": [
            {
                "preset": s.preset,
                "experiment": s.experiment_id,
                "title": s.config.title,
                "seeds": list(s.config.seeds),
                "attribution_matrix": s.matrix,
                "unfinished": s.unfinished,
            }
            for s in sections
        ],
        "checks": [
            {k: c[k] for k in ("preset", "id", "slice_text", "text", "verdict", "reason")}
            for c in checks
        ],
        "combined": list(combined),
        "preregistration": {r["preset"]: r for r in preregistration},
        "claims": every,
    }
    json_path = out_dir / "claims.json"
    json_path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    counts: dict[str, int] = {}
    for c in hypotheses:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    tally = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    passed = sum(c["verdict"] == "pass" for c in checks)
    forest_html = (
        f'<img alt="forest plot of every hypothesis" src="data:image/png;base64,{_image(forest)}">'
        if forest
        else ""
    )
    unfinished = "".join(_warning(f"{s.preset}: {s.unfinished}") for s in sections if s.unfinished)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>covshift battery ({html.escape(size)})</title><style>{CLAIMS_CSS}</style></head><body>
<h1>The textbook account of internal covariate shift, tested ({html.escape(size)} size)</h1>
<p>{len(hypotheses)} hypothesis results: {html.escape(tally)}. {len(checks)} checks of the
instrument and the setups, {passed} passed (listed apart below, never counted as
findings). Each statistic is computed once per seed; the estimate is the
{html.escape(INTERVAL_METHOD)}. Verdicts use one-sided p-values against each rule at level
{ALPHA}, <b>Holm-adjusted over the battery's {family} hypotheses</b> (Benjamini-Hochberg
beside them in claims.json); a preset's own report adjusts over its own hypotheses
only. Every rule was written in the presets before the run (pre-registration below).
Numbers: <a href="claims.json">claims.json</a>.</p>
{unfinished}<h2>Every hypothesis against its rule</h2>
<p>Per row: the 95% interval (line), the estimate (dot), the rule's value (dashed) with
its margin (grey) and the side that supports the claim (green band); the colour is the
adjusted verdict: <span class="supported">supported</span>,
<span class="contradicted">contradicted</span>,
<span class="inconclusive">inconclusive</span>, not interpretable (a check failed),
not measurable; arrows mark a censored side. A drift hypothesis is decided only where
its two drift scales (each unit's width, the layer's first-record width) agree: each
p-value is the larger of the two, and its row says "scales disagree" where they read
differently.</p>
{forest_html}
<h2>Checks</h2>
{_checks_html(checks)}
{_combined_html(combined)}
{_prereg_html(preregistration)}
<h2>Every result</h2>
{claims_table_html(every, link="")}
{"".join(parts_html)}
<h1 id="battery">Across the battery</h1>
{corr_html}
</body></html>
"""
    html_path = out_dir / "claims.html"
    html_path.write_text(page)
    return json_path, html_path
