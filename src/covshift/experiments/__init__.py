"""Experiments: the configuration schema, the shipped presets and the runner."""

from covshift.experiments.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    preset_names,
)

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "preset_names"]
