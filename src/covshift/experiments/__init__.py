"""Experiments: configs and presets, grids of points, backends, sweeps and claims."""

from covshift.experiments.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    preset_names,
)
from covshift.experiments.grid import Point, expand_grid, experiment_id
from covshift.experiments.summary import stored_config, summarize
from covshift.experiments.sweep import plan_sweep, run_experiment, run_sweep

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
