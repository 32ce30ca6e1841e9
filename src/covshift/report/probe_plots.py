"""Figures of probe records (matplotlib, Agg; every figure saved as PNG and SVG).

- :func:`percentile_bands`: per unit, the band between the outer recorded quantiles and
  the median over steps (Ioffe & Szegedy 2015, Fig. 1b,c);
- :func:`shift_heatmap`: layers x steps, colored by a shift metric;
- :func:`colorful_dimension`: per layer, the histogram of its values at every record as
  one image column (steps on x, value on y, log density as color), as fastai's
  "colorful dimension"; the adaptive-range histograms are re-binned onto one grid;
- :func:`gradient_ics_curves` and :func:`smoothness_curves`: Santurkar et al. 2018's
  measures over training;
- :func:`probe_figures`: all of the above that apply, from one run in the store.

Functions take numpy arrays (what ``Store.probe`` returns), so they need no torch.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from covshift.probe.shift_metrics import shift_series
from covshift.store import Store, StoreError

__all__ = [
    "colorful_dimension",
    "gradient_ics_curves",
    "percentile_bands",
    "probe_figures",
    "rebin_histogram",
    "save",
    "shift_heatmap",
    "smoothness_curves",
]

Series = Mapping[str, tuple[np.ndarray, np.ndarray]]  # label -> (steps, values)


def save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.svg`` in ``out_dir``; close it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def percentile_bands(
    steps: np.ndarray,
    quantiles: np.ndarray,
    levels: Sequence[float],
    *,
    units: Sequence[int] | None = None,
    title: str = "",
) -> Figure:
    """One panel per unit: the band between the lowest and highest recorded quantile
    and a line per inner level, over steps. ``quantiles`` is ``(R, Q, U)``; ``units``
    defaults to the first four."""
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 3 or q.shape[1] != len(levels):
        raise ValueError(f"quantiles must be (records, {len(levels)} levels, units), got {q.shape}")
    chosen = list(units) if units is not None else list(range(min(4, q.shape[2])))
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 2.8), squeeze=False)
    for ax, u in zip(axes[0], chosen, strict=True):
        ax.fill_between(steps, q[:, 0, u], q[:, -1, u], alpha=0.25, color="#1f77b4", lw=0)
        for k in range(q.shape[1]):
            ax.plot(
                steps, q[:, k, u], color="#1f77b4", lw=1.4 if k not in (0, q.shape[1] - 1) else 0.6
            )
        ax.set_title(f"unit {u}", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("value (" + "/".join(f"{100 * lv:g}" for lv in levels) + " pct)")
    fig.suptitle(title or "percentiles per unit", fontsize=10)
    fig.tight_layout()
    return fig


def shift_heatmap(
    layers: Sequence[str], steps: np.ndarray, values: np.ndarray, *, metric: str = "kl"
) -> Figure:
    """Layers (rows) x records (columns) colored by ``values`` ``(L, R)``."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (len(layers), len(steps)):
        raise ValueError(
            f"values must be (layers, steps) = {(len(layers), len(steps))}, got {v.shape}"
        )
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(layers) + 1.6))
    image = ax.imshow(v, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(layers)), labels=list(layers), fontsize=8)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(8, len(steps))).round().astype(int))
    ax.set_xticks(ticks, labels=[str(int(steps[t])) for t in ticks], fontsize=8)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric} against the first record", fontsize=10)
    fig.tight_layout()
    return fig


def rebin_histogram(counts: np.ndarray, edges: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts re-binned onto ``new_edges``, each old bin's mass spread uniformly over
    it (the same model as :func:`covshift.probe.shift_metrics.histogram_w1`)."""
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=np.float64))])
    return np.diff(np.interp(np.asarray(new_edges, np.float64), np.asarray(edges, np.float64), cum))


def colorful_dimension(
    steps: np.ndarray, hists: np.ndarray, edges: np.ndarray, *, bins: int = 80, title: str = ""
) -> Figure:
    """Histogram of a layer's values at every record: ``hists (R, B)``, ``edges (R, B+1)``;
    color is ``log(1 + percent of values)`` in each of ``bins`` common bins."""
    h, e = np.asarray(hists, np.float64), np.asarray(edges, np.float64)
    grid = np.linspace(e[:, 0].min(), e[:, -1].max(), bins + 1)
    image = np.stack([rebin_histogram(h[r], e[r], grid) for r in range(len(h))], axis=1)
    image = np.log1p(100.0 * image / np.maximum(image.sum(axis=0, keepdims=True), 1.0))
    fig, ax = plt.subplots(figsize=(6, 3))
    extent = (
        float(steps[0]),
        float(steps[-1]) if len(steps) > 1 else float(steps[0]) + 1,
        grid[0],
        grid[-1],
    )
    ax.imshow(
        image, aspect="auto", origin="lower", cmap="viridis", extent=extent, interpolation="nearest"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title or "colorful dimension", fontsize=10)
    fig.tight_layout()
    return fig


def gradient_ics_curves(l2: Series, cos: Series, *, title: str = "") -> Figure:
    """``||G - G'||`` and ``cos(G, G')`` over steps, one line per layer."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    for label, (steps, values) in l2.items():
        a.plot(steps, values, label=label)
    for label, (steps, values) in cos.items():
        b.plot(steps, values, label=label)
    a.set_ylabel("||G - G'||")
    b.set_ylabel("cos(G, G')")
    b.set_ylim(min(-0.05, b.get_ylim()[0]), 1.05)
    for ax in (a, b):
        ax.set_xlabel("step")
    b.legend(fontsize=7)
    fig.suptitle(title or "gradient ICS (Santurkar et al. 2018)", fontsize=10)
    fig.tight_layout()
    return fig


def smoothness_curves(
    loss_range: Series, grad_predictiveness: Series, beta_smoothness: Series, *, title: str = ""
) -> Figure:
    """The three landscape measures over steps, one line per run (log scale)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    panels = (
        ("loss range", loss_range),
        ("gradient predictiveness", grad_predictiveness),
        ("effective beta-smoothness", beta_smoothness),
    )
    for ax, (name, series) in zip(axes, panels, strict=True):
        for label, (steps, values) in series.items():
            ax.plot(steps, values, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=9)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title or "landscape smoothness (Santurkar et al. 2018)", fontsize=10)
    fig.tight_layout()
    return fig


def _stat(
    store: Store, run_id: int, layer: str, stat: str, scalar: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        steps, values = store.probe(run_id, layer, stat)
    except StoreError:
        return None
    # The store keeps a 0-d statistic as shape (1,): one number per record.
    return (steps, values.reshape(len(steps))) if scalar else (steps, values)


def _titled(store: Store, run_id: int, layer: str) -> str:
    """``layer`` and the axis its units were on (its last record's), when recorded."""
    recorded = store.probe_units(run_id, layer)
    last = recorded[-1] if recorded else None
    if last is None or last.dim is None:
        return layer
    text = f"{layer} (units on axis {last.dim}, {last.source}: {last.rule})"
    return textwrap.fill(text, 120)


def probe_figures(
    store: Store,
    run_id: int,
    out_dir: str | Path,
    *,
    metric: str = "kl",
    units: Sequence[int] | None = None,
) -> list[Path]:
    """Every probe figure that the run's records allow, written to ``out_dir``."""
    paths: list[Path] = []
    heat_layers, heat_rows, heat_steps = [], [], None
    ics_l2: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ics_cos: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, layer in enumerate(store.probe_layers(run_id)):
        stem = f"layer{i:02d}"
        quantiles = _stat(store, run_id, layer, "quantiles")
        levels = _stat(store, run_id, layer, "quantile_levels")
        if quantiles is not None and levels is not None and len(quantiles[0]) >= 1:
            fig = percentile_bands(
                quantiles[0],
                quantiles[1],
                levels[1][0],
                units=units,
                title=_titled(store, run_id, layer),
            )
            paths += save(fig, out_dir, f"{stem}-percentiles")
        hist, edges = _stat(store, run_id, layer, "hist"), _stat(store, run_id, layer, "hist_edges")
        if hist is not None and edges is not None:
            fig = colorful_dimension(hist[0], hist[1], edges[1], title=layer)
            paths += save(fig, out_dir, f"{stem}-colorful")
        mean, std = _stat(store, run_id, layer, "mean"), _stat(store, run_id, layer, "std")
        if mean is not None and std is not None and len(mean[0]) >= 2:
            series = shift_series({"mean": mean[1], "std": std[1]})
            if heat_steps is None or np.array_equal(heat_steps, mean[0]):
                heat_steps = mean[0]
                heat_layers.append(layer)
                heat_rows.append(series[metric])
        for store_key, target in (("grad_ics_l2", ics_l2), ("grad_ics_cos", ics_cos)):
            found = _stat(store, run_id, layer, store_key, scalar=True)
            if found is not None:
                target[layer] = found
    if heat_rows and heat_steps is not None:
        fig = shift_heatmap(heat_layers, heat_steps, np.stack(heat_rows), metric=metric)
        paths += save(fig, out_dir, f"shift-{metric}")
    if ics_l2:
        paths += save(gradient_ics_curves(ics_l2, ics_cos), out_dir, "gradient-ics")
    smooth = [
        _stat(store, run_id, "(model)", k, scalar=True)
        for k in ("loss_range", "grad_predictiveness", "beta_smoothness")
    ]
    if all(s is not None for s in smooth):
        run = f"run {run_id}"
        fig = smoothness_curves(*({run: s} for s in smooth))  # type: ignore[misc]
        paths += save(fig, out_dir, "smoothness")
    return paths
