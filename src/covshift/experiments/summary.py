"""Headline numbers of an experiment, computed from the store alone.

Per network: test accuracy at the report's checkpoints and at the last step, and the
drift of every probed layer (:func:`covshift.probe.quantile_drift`). The same object
is printed by ``--json``, shown in the terminal table and in the HTML report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from covshift.experiments.config import ClaimSpec, ExperimentConfig
from covshift.probe.metrics import unit_quantile_drift
from covshift.store import Store

__all__ = ["evaluate_claim", "summarize", "typical_unit"]


def typical_unit(quantiles: np.ndarray) -> int:
    """The unit whose drift is the median of its layer's: ``(R, Q, U)`` -> index."""
    drift = unit_quantile_drift(quantiles)
    return int(np.argsort(drift)[len(drift) // 2])


def _accuracy_at(steps: np.ndarray, values: np.ndarray, step: int) -> float | None:
    hit = np.nonzero(steps == step)[0]
    return float(values[hit[0]]) if len(hit) else None


def summarize(store: Store, experiment_id: str, config: ExperimentConfig) -> dict[str, Any]:
    """The headline numbers of one experiment, as a JSON-ready dict."""
    runs = {r.config["network"]: r for r in store.runs(experiment=experiment_id)}
    networks: dict[str, Any] = {}
    for key, network in config.networks.items():
        run = runs.get(key)
        if run is None:
            networks[key] = {"label": network.label, "status": "not started"}
            continue
        steps, acc = store.scalars(run.id, "test_accuracy")
        accuracy: dict[str, float | None] = {
            str(c): _accuracy_at(steps, acc, c) for c in config.report.checkpoints
        }
        accuracy["final"] = float(acc[-1]) if len(acc) else None
        drift: dict[str, float | None] = {}
        for layer in store.probe_layers(run.id):
            if "quantiles" not in store.probe_stats(run.id, layer):
                continue  # e.g. gradient-ICS or smoothness records carry no quantiles
            _, quantiles = store.probe(run.id, layer, "quantiles")  # (R, Q, U)
            drift[layer] = (
                float(unit_quantile_drift(quantiles).mean()) if len(quantiles) >= 2 else None
            )
        networks[key] = {
            "label": network.label,
            "run_id": run.id,
            "status": run.status,
            "norm": run.config["model"]["norm"],
            "final_step": int(steps[-1]) if len(steps) else 0,
            "test_accuracy": accuracy,
            "drift": drift,
        }
    return {
        "experiment": experiment_id,
        "claims": [evaluate_claim(c, networks) for c in config.claims],
        "preset": config.name,
        "title": config.title,
        "dataset": config.dataset,
        "steps": config.steps,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer.model_dump(),
        "networks": networks,
    }


def _lookup(entry: dict[str, Any], metric: str) -> float | None:
    node: Any = entry
    for part in metric.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else None


def evaluate_claim(claim: ClaimSpec, networks: dict[str, Any]) -> dict[str, Any]:
    """``{text, metric, values, verdict}`` with verdict ``holds``, ``does not hold`` or
    ``not measured`` (a value is missing, e.g. the run was shorter than the checkpoint)."""
    better = _lookup(networks.get(claim.better, {}), claim.metric)
    than = _lookup(networks.get(claim.than, {}), claim.metric)
    holds = {
        "higher": lambda a, b: a > b,
        "lower": lambda a, b: a < b,
        "not_lower": lambda a, b: a >= b,
        "not_higher": lambda a, b: a <= b,
    }[claim.direction]
    if better is None or than is None:
        verdict = "not measured"
    else:
        verdict = "holds" if holds(better, than) else "does not hold"
    return {
        "text": claim.text,
        "metric": claim.metric,
        "direction": claim.direction,
        "values": {claim.better: better, claim.than: than},
        "verdict": verdict,
    }
