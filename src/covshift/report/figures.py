"""The experiment figure: Ioffe & Szegedy 2015's Figure 1 panels plus per-layer drift.

Panels: (a) test accuracy against steps for every network; one panel per network
with the 15/50/85 percentile band of one typical unit's input (the layer and unit
printed in the title); and the drift of every probed layer, per network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.summary import typical_unit
from covshift.store import Store

__all__ = ["PercentilePanel", "experiment_figure", "percentile_panels", "save_figure"]

_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


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


def percentile_panels(
    store: Store, experiment_id: str, config: ExperimentConfig
) -> list[PercentilePanel]:
    """For each network: its typical (median-drift) unit of the report layer, or the
    unit fixed by ``report.unit``."""
    runs = {r.config["network"]: r for r in store.runs(experiment=experiment_id)}
    panels = []
    for key, network in config.networks.items():
        run = runs.get(key)
        if run is None:
            continue
        layers = store.probe_layers(run.id)
        if not layers:
            continue
        layer = config.report.layer or layers[-1]
        steps, q = store.probe(run.id, layer, "quantiles")  # (R, Q, U)
        unit = (
            config.report.unit
            if config.report.unit is not None
            else (typical_unit(q) if len(q) >= 2 else 0)
        )
        if unit >= q.shape[2]:
            raise ValueError(f"report.unit = {unit}, but layer {layer!r} has {q.shape[2]} units")
        panels.append(
            PercentilePanel(
                key, network.label, layer, unit, steps, q[:, :, unit], config.probe.quantiles
            )
        )
    return panels


def experiment_figure(
    store: Store, experiment_id: str, config: ExperimentConfig, summary: dict
) -> Figure:
    """Build the figure (accuracy, percentile bands per network, drift per layer)."""
    panels = percentile_panels(store, experiment_id, config)
    runs = {r.config["network"]: r for r in store.runs(experiment=experiment_id)}
    n_panels = 2 + len(panels)
    ncols = 2
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 4.0 * nrows), squeeze=False)
    flat = list(axes.flat)
    letters = "abcdefghij"

    ax = flat[0]
    for i, (key, network) in enumerate(config.networks.items()):
        if key in runs:
            steps, acc = store.scalars(runs[key].id, "test_accuracy")
            ax.plot(steps, acc, color=_COLORS[i % len(_COLORS)], label=network.label, lw=1.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"({letters[0]}) test accuracy ({config.dataset})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    finite = [
        v
        for n in summary["networks"].values()
        for v in (n.get("test_accuracy") or {}).values()
        if v is not None
    ]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.02))

    for j, panel in enumerate(panels, start=1):
        ax = flat[j]
        color = _COLORS[list(config.networks).index(panel.network) % len(_COLORS)]
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
        ax.set_title(f"({letters[j]}) {panel.label}: {panel.layer}, unit {panel.unit}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)

    ax = flat[len(panels) + 1]
    nets = [k for k in config.networks if summary["networks"][k].get("drift")]
    layer_names: list[str] = []
    for k in nets:
        layer_names += [x for x in summary["networks"][k]["drift"] if x not in layer_names]
    width = 0.8 / max(1, len(nets))
    for i, key in enumerate(nets):
        drift = summary["networks"][key]["drift"]
        values = [drift.get(layer) or 0.0 for layer in layer_names]
        xs = np.arange(len(layer_names)) + (i - (len(nets) - 1) / 2) * width
        ax.bar(
            xs,
            values,
            width=width,
            color=_COLORS[list(config.networks).index(key) % len(_COLORS)],
            label=config.networks[key].label,
        )
    ax.set_xticks(np.arange(len(layer_names)), layer_names, fontsize=8)
    ax.set_ylabel("drift (typical widths moved)")
    ax.set_title(f"({letters[len(panels) + 1]}) drift per layer, step 0 to last")
    ax.grid(alpha=0.3, axis="y")
    if nets:
        ax.legend(loc="best")
    for extra in flat[n_panels:]:
        extra.set_visible(False)
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
