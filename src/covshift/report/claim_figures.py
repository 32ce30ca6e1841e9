"""One figure per claim result, drawn from the numbers in claims.json and nothing else.

Left panel, what the statistic is computed from: for a ``difference``, each seed's
value of the two sides joined by a line (the pairing); for a ``trend`` or
``threshold``, each seed's metric along the sweep axis per network, diverged runs
marked with a cross and the target drawn. Right panel, the statistic itself: one dot
per seed, the estimate with its 95% interval, and the rule's reference value (with
its margin shaded).
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from covshift.experiments.config import ExperimentConfig

__all__ = ["claim_figure", "describe_statistic"]

_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
_VERDICT_COLORS = {
    "supported": "#1a7f37",
    "pass": "#1a7f37",
    "contradicted": "#b42318",
    "fail": "#b42318",
    "inconclusive": "#9a6700",
    "not interpretable": "#6f42c1",
    "not measurable": "#777777",
    "not measured": "#777777",
}


_HOW = {
    "spearman": "Spearman correlation",
    "slope": "least-squares slope",
    "range": "range (largest minus smallest value)",
}


def _label(config: ExperimentConfig, network: str | None) -> str:
    if network is None:
        return ""
    net = config.networks.get(network)
    return net.label if net is not None else network


def describe_statistic(result: dict[str, Any], config: ExperimentConfig) -> str:
    """The statistic of a claim result in words (for the report and the figure)."""
    if "statistic_text" in result:  # the battery's own claim says it itself
        return str(result["statistic_text"])
    a = _label(config, result["network"])
    if result["statistic"] == "value":
        return f"{result['metric']} of {a}, per seed"
    if result["statistic"] == "layer_trend":
        how = _HOW[result["method"]]
        return f"{how} of {result['metric']} with the layer index (forward order), for {a}"
    if result["statistic"] == "difference" and result.get("interaction"):
        b = _label(config, result["baseline"])
        a_at = ", ".join(f"{k}={result['where'][k]}" for k in result["baseline_where"])
        b_at = ", ".join(f"{k}={v}" for k, v in result["baseline_where"].items())
        return (
            f"({result['metric']} of {a} minus {b}) at {a_at}, minus the same at {b_at}, "
            "paired by seed"
        )
    if result["statistic"] == "difference":
        b = _label(config, result["baseline"] or result["network"])
        left = f"{result['metric']} of {a}"
        right = f"{result['baseline_metric'] or result['metric']} of {b}"
        if result["baseline_where"]:
            a_at = ", ".join(f"{k}={result['where'][k]}" for k in result["baseline_where"])
            b_at = ", ".join(f"{k}={v}" for k, v in result["baseline_where"].items())
            left, right = f"{left} at {a_at}", f"{right} at {b_at}"
        return f"{left} minus {right}, paired by seed"
    if result["statistic"] == "trend":
        axis = f"log2 {result['axis']}" if result["log_axis"] else result["axis"]
        how = _HOW[result["method"]]
        if result["baseline"]:
            b = _label(config, result["baseline"])
            return f"{how} of ({result['metric']} of {a} minus {b}) with {axis}, paired by seed"
        return f"{how} of {result['metric']} with {axis}, for {a}"
    sign = "<=" if result["below"] else ">="
    target = f"{result['metric']} {sign} {result['target']:g} without diverging"
    axis = f"log2 {result['axis']}" if result["log_axis"] else result["axis"]
    base = f", minus that of {_label(config, result['baseline'])}" if result["baseline"] else ""
    return f"the {result['pick']} {axis} at which {target}, for {a}{base}"


def _difference_panel(ax: Axes, result: dict[str, Any], config: ExperimentConfig) -> None:
    a_at = ", ".join(f"{k}={result['where'][k]}" for k in result["baseline_where"])
    b_at = ", ".join(f"{k}={v}" for k, v in result["baseline_where"].items())
    names = [
        f"{_label(config, result['network'])}\n{result['metric']}" + (f"\n{a_at}" if a_at else ""),
        f"{_label(config, result['baseline'] or result['network'])}\n"
        f"{result['baseline_metric'] or result['metric']}" + (f"\n{b_at}" if b_at else ""),
    ]
    if result.get("interaction"):
        gap = f"{_label(config, result['network'])} - {_label(config, result['baseline'])}"
        names = [f"{gap}\n{a_at}", f"{gap}\n{b_at}"]
    if result["statistic"] == "value":
        for i, (seed, d) in enumerate(result["data"].items()):
            if d.get("network") is not None:
                ax.plot(
                    [0], [d["network"]], "o", color=_COLORS[i % len(_COLORS)], label=f"seed {seed}"
                )
        ax.set_xticks([0], [f"{_label(config, result['network'])}\n{result['metric']}"], fontsize=8)
        ax.set_ylabel("value per seed")
        return
    for i, (seed, d) in enumerate(result["data"].items()):
        ys = [d.get("network"), d.get("baseline")]
        if None in ys:
            continue
        ax.plot([0, 1], ys, "-o", color=_COLORS[i % len(_COLORS)], lw=1, ms=5, label=f"seed {seed}")
    ax.set_xticks([0, 1], names, fontsize=8)
    ax.set_xlim(-0.4, 1.4)
    ax.set_ylabel("value per seed")


def _curve_panel(ax: Axes, result: dict[str, Any], config: ExperimentConfig) -> None:
    networks: list[str] = []
    for d in result["data"].values():
        networks += [n for n in d["curve"] if n not in networks]
    for j, net in enumerate(networks):
        color = _COLORS[j % len(_COLORS)]
        for k, d in enumerate(result["data"].values()):
            curve = d["curve"].get(net, [])
            xs = [x for x, y, _ in curve if y is not None]
            ys = [y for _, y, _ in curve if y is not None]
            ax.plot(
                xs,
                ys,
                "-o",
                color=color,
                lw=1,
                ms=3,
                alpha=0.8,
                label=_label(config, net) if k == 0 else None,
            )
            bad = [(x, y) for x, y, diverged in curve if diverged and y is not None]
            if bad:
                ax.plot(
                    *zip(*bad, strict=True),
                    "x",
                    color="black",
                    ms=7,
                    label="diverged" if j == 0 and k == 0 else None,
                )
    xs_all = [x for d in result["data"].values() for c in d["curve"].values() for x, _, _ in c]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
        ax.set_xscale("log")
    ys_all = [y for d in result["data"].values() for c in d["curve"].values() for _, y, _ in c]
    ys_all = [y for y in ys_all if y is not None]
    # Drifts of unnormalized deep networks span orders of magnitude: a log axis.
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) >= 1000:
        ax.set_yscale("log")
    if result["statistic"] == "threshold" and result["target"] is not None:
        ax.axhline(result["target"], color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel(result["axis"] or "layer index (forward order)")
    ax.set_ylabel(result["metric"])


def _statistic_panel(ax: Axes, result: dict[str, Any]) -> None:
    values = [v for v in result["per_seed"].values() if v is not None]  # (None: no bound)
    jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else np.zeros(len(values))
    ax.plot(jitter, values, "o", color="#555555", ms=5, label="per seed")
    if result["estimate"] is not None:
        if result["interval"] is not None:
            lo, hi = result["interval"]
            ax.errorbar(
                [0.25],
                [result["estimate"]],
                yerr=[[result["estimate"] - lo], [hi - result["estimate"]]],
                fmt="s",
                color="black",
                capsize=6,
                label="mean, 95% interval",
            )
        else:
            ax.plot([0.25], [result["estimate"]], "s", color="black", label="the one seed")
    ref, margin = result["value"], result["margin"]
    ax.axhline(ref, color="gray", lw=1, ls="--", label=f"rule: {result['rule']} {ref:g}")
    if margin:
        ax.axhspan(ref - margin, ref + margin, color="gray", alpha=0.15, lw=0)
    ax.set_xlim(-0.3, 0.55)
    ax.set_xticks([])
    ax.set_ylabel("statistic")
    color = _VERDICT_COLORS.get(result["verdict"], "black")
    n = f"{result['seeds']} of {result['seeds_total']} seeds"
    ax.set_title(f"{result['verdict']} ({n})", color=color, fontsize=10)


def claim_figure(result: dict[str, Any], config: ExperimentConfig) -> Figure:
    """The figure of one claim result (see the module docstring)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    if result["statistic"] in ("difference", "value"):
        _difference_panel(left, result, config)
    else:
        _curve_panel(left, result, config)
    _statistic_panel(right, result)
    left.grid(alpha=0.3)
    right.grid(alpha=0.3, axis="y")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:  # nothing measured: no legend to draw
            ax.legend(fontsize=7, loc="best")
    where = f" [{result['slice_text']}]" if result["slice_text"] else ""
    title = f"{result['id']}{where}: {describe_statistic(result, config)}"
    fig.suptitle(title if len(title) < 120 else title[:117] + "...", fontsize=9)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
