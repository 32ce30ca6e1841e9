"""The forest plot: every hypothesis's estimate and interval against its rule.

One row per hypothesis result (claim and slice), grouped by preset, each on its own
horizontal scale (the statistics are accuracies, step counts, drifts, correlations):
the 95% interval as a line, the estimate as a dot, the rule's bound as a dashed line
(``value``) with its margin shaded, the side that supports the claim tinted. The
colour is the verdict after the family's adjustment. A censored side is drawn as an
arrow to the edge of the row; a result that could not be measured honestly, or was
not measured, is written out instead of drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from covshift.experiments.claim_result import verdict_p_adjusted
from covshift.experiments.scale_check import scales_disagree
from covshift.report.figures import save_figure

__all__ = ["VERDICT_COLORS", "forest_plot"]

VERDICT_COLORS = {
    "supported": "#1a7f37",
    "contradicted": "#b42318",
    "inconclusive": "#9a6700",
    "not interpretable": "#6f42c1",
    "not measurable": "#777777",
    "not measured": "#aaaaaa",
}

# Which side of the bound supports each rule (+1: above, -1: below, 0: inside the band).
_SIDE = {"greater": 1, "not_less": 1, "less": -1, "not_greater": -1, "within": 0}


def _label(r: dict[str, Any]) -> str:
    text = r["id"] + (f" [{r['slice_text']}]" if r["slice_text"] else "")
    return text if len(text) <= 48 else text[:47] + "…"


def _limits(r: dict[str, Any]) -> tuple[float, float]:
    """A range showing the interval, the estimate and the rule's band."""
    v, m = r["value"], r["margin"]
    points = [v - m, v + m]
    if r["estimate"] is not None:
        points.append(r["estimate"])
    for x in r["interval"] or []:
        if x is not None and math.isfinite(x):
            points.append(x)
    lo, hi = min(points), max(points)
    pad = (hi - lo) * 0.15 or max(abs(v), 1.0) * 0.1
    return lo - pad, hi + pad


def _row(ax: Any, r: dict[str, Any]) -> None:
    color = VERDICT_COLORS.get(r["verdict"], "black")
    lo, hi = _limits(r)
    ax.set_xlim(lo, hi)
    ax.set_ylim(-1, 1)
    ax.set_yticks([])
    v, m = r["value"], r["margin"]
    side = _SIDE[r["rule"]]
    bound = v + m if r["rule"] == "not_greater" else v - m if r["rule"] == "not_less" else v
    if side > 0:
        ax.axvspan(bound, hi, color="#e6f4ea", zorder=0)
    elif side < 0:
        ax.axvspan(lo, bound, color="#e6f4ea", zorder=0)
    else:
        ax.axvspan(v - m, v + m, color="#e6f4ea", zorder=0)
    if m > 0:
        ax.axvspan(v - m, v + m, color="#dddddd", alpha=0.5, zorder=0)
    ax.axvline(v, color="#555555", ls="--", lw=0.8)
    if r["estimate"] is None or r["interval"] is None:
        text = r["verdict"] if r["estimate"] is None else "one seed"
        if (r.get("censored") or {}).get("side") == "both":
            text = f"{r['verdict']}: a seed without any bound"
        if r.get("measurable") is False:
            text = "not measurable"
        ax.text(
            0.5,
            0.5,
            text,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=7,
            color=color,
        )
        return
    a, b = r["interval"]
    left = lo if a is None or not math.isfinite(a) else a
    right = hi if b is None or not math.isfinite(b) else b
    ax.plot([left, right], [0, 0], color=color, lw=2)
    if left == lo:
        ax.annotate(
            "", (lo, 0), (lo + (hi - lo) * 0.08, 0), arrowprops={"arrowstyle": "->", "color": color}
        )
    if right == hi:
        ax.annotate(
            "", (hi, 0), (hi - (hi - lo) * 0.08, 0), arrowprops={"arrowstyle": "->", "color": color}
        )
    ax.plot([r["estimate"]], [0], "o", color=color, ms=4)


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-inf" if x is not None and x < 0 else "inf" if x is not None else "-"
    return f"{x:+.3g}"


def _numbers(r: dict[str, Any]) -> str:
    """The row's estimate, interval, adjusted p and marks, as text."""
    if r["estimate"] is None:
        return r["verdict"]
    text = _fmt(r["estimate"])
    if r["interval"] is not None:
        text += f" [{_fmt(r['interval'][0])}, {_fmt(r['interval'][1])}]"
    p = verdict_p_adjusted(r)
    if p is not None:
        text += f"  p adj {p:.2g}"
    marks = []
    if (r.get("censored") or {}).get("censored"):
        marks.append("censored")
    if r.get("excluded_units"):
        marks.append(f"{r['excluded_units']} units excluded")
    if scales_disagree(r):
        marks.append("scales disagree")
    return text + (f"  ({', '.join(marks)})" if marks else "")


def forest_plot(results: Sequence[dict[str, Any]], out_dir: Path, stem: str) -> Path | None:
    """Draw the hypotheses of ``results`` (grouped by ``preset``); PNG path, or None
    without hypotheses."""
    rows = [r for r in results if r.get("kind", "hypothesis") == "hypothesis"]
    if not rows:
        return None
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for r in rows:
        name = r.get("preset") or r["experiment"]
        if not groups or groups[-1][0] != name:
            groups.append((name, []))
        groups[-1][1].append(r)
    lines = sum(len(g) + 1 for _, g in groups)
    # Each row on its own scale (accuracies, step counts, drifts and correlations do not
    # share one), with its own tick labels and its numbers written beside it.
    fig = plt.figure(figsize=(11.0, 0.42 * lines + 0.8))
    grid = fig.add_gridspec(lines, 1, hspace=1.1, left=0.31, right=0.74, top=0.99, bottom=0.01)
    line = 0
    for name, group in groups:
        head = fig.add_subplot(grid[line, 0])
        head.axis("off")
        head.text(-0.45, 0.0, name, transform=head.transAxes, fontsize=9, weight="bold")
        line += 1
        for r in group:
            ax = fig.add_subplot(grid[line, 0])
            _row(ax, r)
            ax.tick_params(axis="x", labelsize=5.5, length=2, pad=1)
            ax.locator_params(axis="x", nbins=5)
            color = VERDICT_COLORS.get(r["verdict"], "black")
            ax.text(
                -0.01,
                0.5,
                _label(r),
                transform=ax.transAxes,
                ha="right",
                va="center",
                fontsize=7,
                color=color,
            )
            ax.text(
                1.02,
                0.5,
                _numbers(r),
                transform=ax.transAxes,
                ha="left",
                va="center",
                fontsize=6.5,
                color=color,
            )
            line += 1
    png, _ = save_figure(fig, out_dir, stem)
    plt.close(fig)
    return png
