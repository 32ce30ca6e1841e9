"""The experiment figure: Ioffe & Szegedy 2015's Figure 1 panels plus per-layer drift.

Panels: (a) test accuracy against steps for every network (mean over seeds, their
range shaded); without sweep axes, one panel per network with the 15/50/85
percentile band of one typical unit's input (of its first seed; the layer, unit and
seed printed in the title) and the drift of every probed layer, per network (mean
and standard deviation over seeds); with sweep axes, final accuracy along each axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.experiment_summary import typical_unit
from covshift.experiments.grid import format_axes
from covshift.experiments.numbers import probed_layers
from covshift.store import Store

__all__ = ["PercentilePanel", "experiment_figure", "percentile_panels", "save_figure"]

_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
_MAX_CELLS = 12  # more curves than this would not be readable in one panel


@dataclass(frozen=True)
class PercentilePanel:
    """The data of one percentile panel: which layer and unit, and the bands."""

    network: str
    label: str
    layer: str
    unit: int
    steps: np.ndarray  # (R,)
    quantiles: np.ndarray  # (R, Q) for the chosen unit
    levels: tuple[float, ...]


def _first_runs(summary: dict) -> dict[str, dict]:
    """Per network, the point row of its first seed at the first axis values whose run
    has ended (one that has not holds a prefix of its records)."""
    first: dict[str, dict] = {}
    for row in summary["points"]:
        ended = row["run_id"] is not None and row.get("complete", True)
        if ended and row["network"] not in first:
            first[row["network"]] = row
    return first


def percentile_panels(
    store: Store, experiment_id: str, config: ExperimentConfig, summary: dict
) -> list[PercentilePanel]:
    """For each network (its first seed, at the first value of every axis): its
    typical (median-drift) unit of the report layer, or the unit fixed by
    ``report.unit``."""
    panels = []
    for key, row in _first_runs(summary).items():
        layers = probed_layers(store, row["run_id"])
        if not layers:
            continue
        layer = config.report.layer or layers[-1]
        steps, q = store.probe(row["run_id"], layer, "quantiles")  # (R, Q, U)
        unit = (
            config.report.unit
            if config.report.unit is not None
            else (typical_unit(q) if len(q) >= 2 else 0)
        )
        if unit >= q.shape[2]:
            raise ValueError(f"report.unit = {unit}, but layer {layer!r} has {q.shape[2]} units")
        label = f"{config.networks[key].label}, seed {row['seed']}"
        panels.append(
            PercentilePanel(key, label, layer, unit, steps, q[:, :, unit], config.probe.quantiles)
        )
    return panels


def _cell_label(config: ExperimentConfig, cell: dict) -> str:
    axes = format_axes(cell["axes"])
    return config.networks[cell["network"]].label + (f" ({axes})" if axes else "")


def _accuracy_panel(ax: Axes, store: Store, config: ExperimentConfig, summary: dict) -> None:
    """Test accuracy against steps: mean over seeds per cell, the seeds' range shaded
    (the test loss, on a log scale, for a regression task, which has no accuracy).
    Runs that have not ended are left out: their curves would cut the cell's short."""
    ended = {
        p["run_id"]
        for p in summary["points"]
        if p["run_id"] is not None and p.get("complete", True)
    }
    runs = [r for cell in summary["cells"] for r in cell["run_ids"] if r in ended]
    series = "test_accuracy"
    if runs and not any(len(store.scalars(r, series)[0]) for r in runs[:4]):
        series = "test_loss"
    for i, cell in enumerate(summary["cells"][:_MAX_CELLS]):
        curves = [store.scalars(r, series) for r in cell["run_ids"] if r in ended]
        curves = [c for c in curves if len(c[0])]
        if not curves:
            continue
        steps = min((c[0] for c in curves), key=len)  # diverged runs stop early
        values = np.stack([c[1][: len(steps)] for c in curves])
        color = _COLORS[i % len(_COLORS)]
        n = len(curves)
        ax.plot(
            steps,
            values.mean(0),
            color=color,
            lw=1.5,
            label=f"{_cell_label(config, cell)}, {n} seed{'s' * (n > 1)}",
        )
        if n > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15, lw=0)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best" if series == "test_loss" else "lower right", fontsize=8)
    if series == "test_loss":
        ax.set_ylabel("test loss")
        ax.set_yscale("log")
        ax.set_title(f"(a) test loss ({config.dataset}): mean, range over seeds")
        return
    ax.set_ylabel("test accuracy")
    ax.set_title(f"(a) test accuracy ({config.dataset}): mean, range over seeds")
    finite = [
        v
        for c in summary["cells"]
        for v in (c.get("test_accuracy") or {}).values()
        if v is not None
    ]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.02))


def _percentile_panel(ax: Axes, panel: PercentilePanel, color: str, letter: str) -> None:
    lo, hi = panel.quantiles[:, 0], panel.quantiles[:, -1]
    ax.fill_between(panel.steps, lo, hi, color=color, alpha=0.18, lw=0)
    for k, level in enumerate(panel.levels):
        ax.plot(
            panel.steps,
            panel.quantiles[:, k],
            color=color,
            lw=1.8 if k == len(panel.levels) // 2 else 1.0,
            label=f"{level * 100:g}th percentile",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("input to the activation")
    ax.set_title(f"({letter}) {panel.label}: {panel.layer}, unit {panel.unit}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _drift_panel(ax: Axes, config: ExperimentConfig, summary: dict, letter: str) -> None:
    """Drift per layer: mean over seeds per cell, the standard deviation as error bar."""
    cells = [c for c in summary["cells"][:_MAX_CELLS] if c.get("drift")]
    layer_names: list[str] = []
    for c in cells:
        layer_names += [x for x in c["drift"] if x not in layer_names]
    width = 0.8 / max(1, len(cells))
    for i, cell in enumerate(cells):
        values = [cell["drift"].get(layer) or 0.0 for layer in layer_names]
        errors = [cell["drift_sd"].get(layer) or 0.0 for layer in layer_names]
        xs = np.arange(len(layer_names)) + (i - (len(cells) - 1) / 2) * width
        ax.bar(
            xs,
            values,
            width=width,
            yerr=errors,
            capsize=3,
            color=_COLORS[i % len(_COLORS)],
            label=_cell_label(config, cell),
        )
    ax.set_xticks(np.arange(len(layer_names)), layer_names, fontsize=8)
    ax.set_ylabel("drift (typical widths moved)")
    ax.set_title(f"({letter}) drift per layer, step 0 to last (mean, sd over seeds)")
    ax.grid(alpha=0.3, axis="y")
    if cells:
        ax.legend(loc="best", fontsize=8)


def _axis_panel(ax: Axes, config: ExperimentConfig, summary: dict, axis: str, letter: str) -> None:
    """Final test accuracy along one sweep axis, per network (mean, sd over seeds)."""
    values = list(config.sweep[axis])
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    for i, network in enumerate(config.networks):
        cells = [c for c in summary["cells"] if c["network"] == network]
        ys, errs = [], []
        for v in values:
            matching = [c for c in cells if c["axes"].get(axis) == v]
            finals = [c["test_accuracy"].get("final") for c in matching]
            finals = [f for f in finals if f is not None]
            ys.append(np.mean(finals) if finals else np.nan)
            sds = [c["test_accuracy_sd"].get("final") or 0.0 for c in matching]
            errs.append(np.mean(sds) if sds else 0.0)
        ax.errorbar(
            xs,
            ys,
            yerr=errs,
            fmt="-o",
            capsize=3,
            color=_COLORS[i % len(_COLORS)],
            label=config.networks[network].label,
        )
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(axis)
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"({letter}) final test accuracy along {axis}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def experiment_figure(
    store: Store, experiment_id: str, config: ExperimentConfig, summary: dict
) -> Figure:
    """Accuracy over training; without axes, the percentile bands per network (first
    seed) and the drift per layer; with axes, final accuracy along each axis."""
    panels = [] if config.sweep else percentile_panels(store, experiment_id, config, summary)
    extra = list(config.sweep) if config.sweep else ["drift"]
    n_panels = 1 + len(panels) + len(extra)
    ncols = 2
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 4.0 * nrows), squeeze=False)
    flat = list(axes.flat)
    letters = "abcdefghijklmnopqrstuvwxyz"
    _accuracy_panel(flat[0], store, config, summary)
    for j, panel in enumerate(panels, start=1):
        color = _COLORS[list(config.networks).index(panel.network) % len(_COLORS)]
        _percentile_panel(flat[j], panel, color, letters[j])
    for k, name in enumerate(extra, start=len(panels) + 1):
        if name == "drift":
            _drift_panel(flat[k], config, summary, letters[k])
        else:
            _axis_panel(flat[k], config, summary, name, letters[k % len(letters)])
    for unused in flat[n_panels:]:
        unused.set_visible(False)
    fig.suptitle(config.title, fontsize=11)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
