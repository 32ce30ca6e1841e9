"""Headline numbers of an experiment, computed from the store alone.

Per point: its status, test accuracy at the report's checkpoints and at the last
step, and the drift of every probed layer (:mod:`covshift.experiments.numbers`). Per
cell (a network at one value of every axis): the mean and standard deviation of those
over seeds. Per claim: estimate, interval and verdict (:mod:`.claims`). The same
object is printed by ``--json``, shown in the terminal tables and written to the
report's ``summary.json``; ``points.csv`` has one row per point.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from covshift.experiments.claims import evaluate_claims
from covshift.experiments.config import ConfigError, ExperimentConfig
from covshift.experiments.grid import Point, expand_grid, format_axes
from covshift.experiments.numbers import COMPLETE_STATUSES, PointNumbers, load_numbers
from covshift.probe.shift_metrics import unit_quantile_drift
from covshift.store import Store

__all__ = [
    "json_safe",
    "load_experiment_numbers",
    "stored_config",
    "summarize",
    "typical_unit",
    "unfinished_note",
    "write_points_csv",
]


def typical_unit(quantiles: np.ndarray) -> int:
    """The unit whose drift is the median of its layer's: ``(R, Q, U)`` -> index."""
    drift = unit_quantile_drift(quantiles)
    return int(np.argsort(drift)[len(drift) // 2])


def stored_config(store: Store, experiment_id: str) -> ExperimentConfig:
    """The configuration an experiment was recorded with (for resuming and reports)."""
    raw = store.experiment_config(experiment_id)
    if raw is None:
        from covshift.experiments.legacy import adopt_legacy_experiment

        raw = adopt_legacy_experiment(store, experiment_id)
    if raw is None:
        known = ", ".join(e[0] for e in store.experiments()[:5]) or "none yet"
        raise ConfigError(
            f"no experiment {experiment_id!r} in {store.path} (recent: {known}); "
            "`covshift runs` lists the experiments"
        )
    return ExperimentConfig.model_validate(raw)


def load_experiment_numbers(
    store: Store, config: ExperimentConfig
) -> tuple[list[Point], dict[str, PointNumbers]]:
    """The grid of ``config`` and what the store holds of each point."""
    points = expand_grid(config)
    runs = store.runs_of_points([p.id for p in points])
    return points, {
        p.id: load_numbers(store, runs.get(p.id), (p.spec.steps, p.spec.eval_every)) for p in points
    }


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None, 0
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return float(np.mean(finite)), sd, len(finite)


def _cell(config: ExperimentConfig, network: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of one cell's headline numbers."""
    out: dict[str, Any] = {
        "label": config.networks[network].label,
        "network": network,
        "axes": rows[0]["axes"],
        "norm": rows[0]["norm"],
        "seeds": [r["seed"] for r in rows],
        "run_ids": [r["run_id"] for r in rows],
        "status": dict(Counter(r["status"] for r in rows)),
        "final_step": max(r["final_step"] for r in rows),
        "diverged": sum(r["status"] == "diverged" for r in rows),
    }
    for group in ("test_accuracy", "drift"):
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r[group] if k not in keys]
        means, sds = {}, {}
        for k in keys:
            means[k], sds[k], _ = _mean_sd([r[group].get(k) for r in rows])
        out[group], out[f"{group}_sd"] = means, sds
    return out


def summarize(
    store: Store,
    experiment_id: str,
    config: ExperimentConfig,
    loaded: tuple[list[Point], dict[str, PointNumbers]] | None = None,
) -> dict[str, Any]:
    """The headline numbers and claims of one experiment, as a JSON-ready dict;
    ``loaded`` is what :func:`load_experiment_numbers` returned, when the caller has it."""
    points, numbers = loaded if loaded is not None else load_experiment_numbers(store, config)
    rows = []
    for p in points:
        n = numbers[p.id]
        rows.append(
            {
                "point": p.id,
                "position": p.position,
                "network": p.network,
                "label": p.label,
                "seed": p.seed,
                "axes": p.axes,
                "norm": p.spec.model.norm,
                **n.headline(config.report.checkpoints),
            }
        )
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["network"], format_axes(row["axes"])), []).append(row)
    cell_list = [_cell(config, net, group) for (net, _), group in cells.items()]
    summary: dict[str, Any] = {
        "experiment": experiment_id,
        "preset": config.name,
        "title": config.title,
        "dataset": config.dataset,
        "steps": config.steps,
        "seeds": list(config.seeds),
        "batch_size": config.batch_size,
        "optimizer": config.optimizer.model_dump(),
        "axes": {k: list(v) for k, v in config.sweep.items()},
        "grid": {
            "networks": len(config.networks),
            "axes": {k: len(v) for k, v in config.sweep.items()},
            "seeds": len(config.seeds),
            "points": len(points),
            "status": dict(Counter(r["status"] for r in rows)),
            "unfinished": sum(1 for r in rows if r["run_id"] is not None and not r["complete"]),
        },
        "claims": evaluate_claims(config, experiment_id, points, numbers),
        "cells": cell_list,
        "points": rows,
    }
    if not config.sweep:  # one cell per network: keyed by network, as before sweeps
        summary["networks"] = {c["network"]: c for c in cell_list}
    return summary


def unfinished_note(
    summary: dict[str, Any], experiment_id: str, store_path: Path, resume: str | None = None
) -> str | None:
    """What a report must say when some points' runs have not ended (running,
    interrupted, failed): they are left out of every number, and how to complete them
    (``resume``: the command that does; by default ``covshift run --resume``); None when
    every recorded run has ended."""
    grid = summary["grid"]
    if not grid.get("unfinished"):
        return None
    open_states = {
        status: n
        for status, n in grid["status"].items()
        if status not in COMPLETE_STATUSES and status != "not started"
    }
    states = ", ".join(f"{n} {status}" for status, n in sorted(open_states.items()))
    resume = resume or f"`covshift run --resume {experiment_id} --db {store_path}`"
    return (
        f"{grid['unfinished']} of {grid['points']} points have not finished ({states}): "
        "their numbers are left out of the tables and claims, which use the finished "
        f"seeds only; {resume} completes them"
    )


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_points_csv(summary: dict[str, Any], path: Path) -> Path:
    """One row per point: its coordinates (each axis a column) and headline numbers."""
    axes = list(summary["axes"])
    acc_keys: list[str] = []
    drift_keys: list[str] = []
    for row in summary["points"]:
        acc_keys += [k for k in row["test_accuracy"] if k not in acc_keys]
        drift_keys += [k for k in row["drift"] if k not in drift_keys]
    header = (
        [
            "experiment",
            "point",
            "network",
            "label",
            "seed",
            *axes,
            "norm",
            "status",
            "diverged_at",
            "final_step",
        ]
        + [f"test_accuracy_{k}" for k in acc_keys]
        + ["test_loss_final"]
        + [f"drift_{k}" for k in drift_keys]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in summary["points"]:
            writer.writerow(
                [summary["experiment"], row["point"], row["network"], row["label"], row["seed"]]
                + [row["axes"].get(a) for a in axes]
                + [row["norm"], row["status"], row["diverged_at"], row["final_step"]]
                + [_csv(row["test_accuracy"].get(k)) for k in acc_keys]
                + [_csv(row["test_loss"]["final"])]
                + [_csv(row["drift"].get(k)) for k in drift_keys]
            )
    return path


def _csv(value: float | None) -> str:
    return "" if value is None else repr(value)
