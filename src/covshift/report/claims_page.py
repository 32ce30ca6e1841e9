"""``claims.json`` and a self-contained ``claims.html`` (figures inline) for claims.

Per claim result: its text and operational reading, the statistic in words, the rule
as written before the run, the estimate with its 95% interval over seeds (and how it
was computed), the per-seed values, the verdict with its reason, and the figure whose
numbers are those of ``claims.json``.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covshift.experiments.claims import INTERVAL_METHOD
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.experiment_summary import json_safe
from covshift.experiments.scale_check import scales_disagree
from covshift.report.claim_figures import claim_figure, describe_statistic
from covshift.report.figures import save_figure

__all__ = ["CLAIMS_CSS", "claims_table_html", "fmt_interval", "write_claims"]

CLAIMS_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222;
       line-height: 1.45; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.supported { color: #1a7f37; font-weight: 600; }
.contradicted { color: #b42318; font-weight: 600; }
.inconclusive { color: #9a6700; font-weight: 600; }
.not-measured, .not-measurable { color: #777; }
.pass { color: #1a7f37; font-weight: 600; }
.fail { color: #b42318; font-weight: 600; }
.not-interpretable { color: #6f42c1; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 0 0.2em; }
section.claim { border-top: 1px solid #ddd; margin-top: 1.5em; }
p.warning { background: #fff4e5; border-left: 4px solid #b54708; padding: 0.5em 0.8em; }
"""


def _num(value: float | None, digits: int = 4) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}g}"


def fmt_interval(result: dict[str, Any]) -> str:
    """``[lo, hi]`` or a dash."""
    if result["interval"] is None:
        return "&ndash;"
    lo, hi = result["interval"]
    return f"[{_num(lo)}, {_num(hi)}]"


def _verdict(result: dict[str, Any]) -> str:
    css = result["verdict"].replace(" ", "-")
    return f'<span class="{css}">{html.escape(result["verdict"])}</span>'


def claims_table_html(results: Sequence[dict[str, Any]], link: str | None = None) -> str:
    """The verdict table (one row per claim and slice)."""
    rows = []
    for r in results:
        name = html.escape(r["id"] + (f" [{r['slice_text']}]" if r["slice_text"] else ""))
        if link:
            name = f'<a href="{link}#{html.escape(_anchor(r))}">{name}</a>'
        rows.append(
            f"<tr><td>{name}</td><td>{html.escape(r['text'])}</td>"
            f'<td class="num">{_num(r["estimate"])}</td><td class="num">{fmt_interval(r)}</td>'
            f'<td class="num">{r["seeds"]}</td><td>{_verdict(r)}{_marks(r)}</td></tr>'
        )
    head = "<tr><th>claim</th><th>text</th><th>estimate</th><th>95% interval</th><th>seeds</th>"
    return f"<table>{head}<th>verdict</th></tr>{''.join(rows)}</table>"


def _marks(result: dict[str, Any]) -> str:
    """What qualifies a verdict in the table: units left out, a censored side, two
    drift scales that read differently."""
    marks = []
    if result.get("excluded_units"):
        marks.append(f"{result['excluded_units']} of {result.get('units')} units excluded")
    if (result.get("censored") or {}).get("censored"):
        marks.append(f"censored {result['censored'].get('side')}")
    if scales_disagree(result):
        other = result["other_scale"]
        marks.append(
            f"scales disagree: {result['verdict_own_scale']} here, {other['verdict']} in "
            f"{str(other['metric']).split('/')[0]}"
        )
    return "".join(f"<br><small>{html.escape(m)}</small>" for m in marks)


def _anchor(result: dict[str, Any]) -> str:
    return result["id"] + ("-" + result["slice_text"] if result["slice_text"] else "")


def _slug(result: dict[str, Any]) -> str:
    raw = _anchor(result)
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in raw)


def _section(result: dict[str, Any], config: ExperimentConfig, image: str) -> str:
    per_seed = ", ".join(
        f"seed {s}: {'no bound' if v is None else _num(v)}" for s, v in result["per_seed"].items()
    )
    missing = [s for s in result["data"] if s not in result["per_seed"]]
    if missing:
        per_seed += f" (no value for seed {', '.join(missing)})"
    where = f" &mdash; slice {html.escape(result['slice_text'])}" if result["slice_text"] else ""
    reading = (
        f"<p><b>Operational reading:</b> {html.escape(result['reading'])}</p>"
        if result["reading"]
        else ""
    )
    rule = (
        f"<code>{html.escape(result['rule'])}</code>, value {result['value']:g}, margin "
        f"{result['margin']:g}: {html.escape(result['rule_text'])}"
    )
    if result.get("margin_reason"):
        rule += f"<br><i>Margin:</i> {html.escape(result['margin_reason'])}"
    seeds = f"{result['seeds']} of {result['seeds_total']}: {per_seed or '&ndash;'}"
    kind = result.get("kind", "hypothesis")
    extra = ""
    if result.get("p_value") is not None:
        adjusted = ""
        if result.get("p_adjusted") is not None:
            adjusted = (
                f"; {html.escape(str(result['adjust_method']))}-adjusted over "
                f"{result['family_size']} hypotheses: {_num(result['p_adjusted'], 2)} and "
                f"{_num(result['p_adjusted_contradict'], 2)} (Benjamini-Hochberg: "
                f"{_num(result.get('p_adjusted_bh'), 2)})"
            )
        method = html.escape(str(result.get("p_method", "")))
        extra += (
            f"<tr><th>p-values</th><td>{_num(result['p_value'], 2)} for the claim, "
            f"{_num(result['p_contradict'], 2)} against it ({method}){adjusted}</td></tr>"
        )
    censored = result.get("censored") or {}
    if censored.get("censored"):
        extra += (
            f"<tr><th>censored</th><td>{html.escape(str(censored.get('side')))}: "
            f"{html.escape(censored.get('note', ''))} ({censored.get('seeds')} seeds)</td></tr>"
        )
    if result.get("units"):
        extra += (
            f"<tr><th>units</th><td>{result['excluded_units']} of {result['units']} excluded "
            "as degenerate (collapsed, saturated or dead), summed over the points read</td></tr>"
        )
    other = result.get("other_scale")
    if other:
        own = result.get("verdict_own_scale")
        judged = (
            f"; {html.escape(str(own))} in its own scale, and each p-value above is the "
            "larger of the two scales' (the verdict holds only where both agree)"
            if own is not None
            else " (no p-values: judged in its own scale only)"
        )
        extra += (
            f"<tr><th>other scale</th><td><code>{html.escape(str(other['metric']))}</code>: "
            f"{_num(other['estimate'])} {fmt_interval(other)}, "
            f"{html.escape(str(other['verdict']))} unadjusted{judged}</td></tr>"
        )
    if result.get("controls"):
        extra += (
            f"<tr><th>positive controls</th><td>{html.escape(', '.join(result['controls']))}"
            "</td></tr>"
        )
    title = ("Check: " if kind == "check" else "") + html.escape(result["id"])
    return f"""<section class="claim" id="{html.escape(_anchor(result))}">
<h2>{title}{where}</h2>
<p><b>{"Check" if kind == "check" else "Claim"}:</b> {html.escape(result["text"])}</p>
{reading}
<table>
<tr><th>statistic</th><td>{html.escape(describe_statistic(result, config))}</td></tr>
<tr><th>rule (fixed in the preset)</th><td>{rule}</td></tr>
<tr><th>estimate</th><td class="num">{_num(result["estimate"])}</td></tr>
<tr><th>95% interval</th><td class="num">{fmt_interval(result)}</td></tr>
<tr><th>seeds</th><td>{seeds}</td></tr>
{extra}
<tr><th>verdict</th><td>{_verdict(result)} ({html.escape(result["reason"])})</td></tr>
</table>
<img alt="figure of {html.escape(result["id"])}" src="data:image/png;base64,{image}">
</section>"""


def write_claims(
    results: Sequence[dict[str, Any]],
    config: ExperimentConfig,
    experiment_id: str,
    out_dir: Path,
    *,
    figures: bool = True,
) -> tuple[Path, Path]:
    """Write ``claims.json``, ``claims.html`` and one ``claim-*.png``/``.svg`` per
    result into ``out_dir``; returns the two main files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    files = []
    for result in results:
        image = ""
        if figures:
            png, svg = save_figure(claim_figure(result, config), out_dir, f"claim-{_slug(result)}")
            image = base64.b64encode(png.read_bytes()).decode("ascii")
            files.append(
                {"id": result["id"], "slice": result["slice"], "png": png.name, "svg": svg.name}
            )
        sections.append(_section(result, config, image))
    payload = {
        "experiment": experiment_id,
        "preset": config.name,
        "title": config.title,
        "interval_method": INTERVAL_METHOD,
        "seeds": list(config.seeds),
        "claims": [
            {**r, "figure": f["png"]} if figures else dict(r)
            for r, f in zip(results, files or [{}] * len(results), strict=True)
        ],
    }
    json_path = out_dir / "claims.json"
    json_path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Claims: {html.escape(config.title)}</title><style>{CLAIMS_CSS}</style></head><body>
<h1>Claims: {html.escape(config.title)}</h1>
<p>Experiment <code>{html.escape(experiment_id)}</code>; seeds {
        ", ".join(str(s) for s in config.seeds)
    }. Each claim's statistic is computed once per seed; the estimate is the
{html.escape(INTERVAL_METHOD)}. The verdict applies the rule written in the preset
before the run, on one-sided p-values Holm-adjusted over this experiment's hypotheses;
checks (controls of the instrument and the setup) pass or fail apart and are not
findings; a claim measured on one seed is inconclusive. Numbers:
<a href="claims.json">claims.json</a>.</p>
{claims_table_html(results, link="")}
{"".join(sections)}
</body></html>
"""
    html_path = out_dir / "claims.html"
    html_path.write_text(page)
    return json_path, html_path
