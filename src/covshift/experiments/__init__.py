"""Experiments: configs and presets, grids of points, backends, sweeps and claims.

The names below load their module on first use (PEP 562): a sweep's worker process
imports only what trains a point, not the statistics and reporting of the driver
(SciPy's statistics alone take 0.6 s to import, paid by every worker at start).
"""

from __future__ import annotations

import importlib
from typing import Any

from covshift.experiments.config import ConfigError, ExperimentConfig
from covshift.experiments.config_files import load_config, preset_names

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "Point",
    "expand_grid",
    "experiment_id",
    "load_config",
    "plan_sweep",
    "preset_names",
    "run_experiment",
    "run_sweep",
    "stored_config",
    "summarize",
]

_LAZY = {
    "Point": "covshift.experiments.grid",
    "expand_grid": "covshift.experiments.grid",
    "experiment_id": "covshift.experiments.grid",
    "plan_sweep": "covshift.experiments.sweep",
    "run_experiment": "covshift.experiments.sweep",
    "run_sweep": "covshift.experiments.sweep",
    "stored_config": "covshift.experiments.experiment_summary",
    "summarize": "covshift.experiments.experiment_summary",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'covshift.experiments' has no attribute {name!r}")
