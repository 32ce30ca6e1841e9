"""The grid of an experiment: its points, each with a stable identity.

A point is one network, at one value of every sweep axis, with one seed: the unit of
work, of resumption and of storage. Its identity is a hash of everything that
determines its numbers (the resolved :class:`PointSpec`), so the same point reached
from two presets, or from one preset run twice, is trained and recorded once;
labels, claims and report settings are not part of it.

The grid is ordered seed by seed (every network and axis value of seed 0, then of
seed 1, ...), so that an interrupted sweep has whole seeds to show.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from covshift.experiments.axes import set_dotted
from covshift.experiments.config import (
    ConfigError,
    DivergenceSpec,
    ExperimentConfig,
    ModelSpec,
    OptimizerSpec,
    ProbeSpec,
)

__all__ = ["Point", "PointSpec", "expand_grid", "experiment_id", "format_axes"]

# Bumped when the meaning of a PointSpec field changes, so old points are not reused.
_IDENTITY_VERSION = 1
# (section, field, default as JSON) of the fields added since version 1.
_ADDED_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("model", "convs_per_stage", 2),
    ("model", "pool", "avg"),
    ("model", "freeze", []),
    ("optimizer", "lr_reference_batch", None),
    ("probe", "mode", "eval"),
    ("probe", "noise_floor", False),
    ("probe", "gradient_ics_every", 0),
    ("probe", "smoothness_every", 0),
    ("probe", "smoothness_range", [0.5, 4.0]),
    ("probe", "measure_batch", None),
    ("", "test_examples", None),
    ("model", "heads", 4),
    ("model", "context", 128),
    ("model", "mlp_ratio", 4),
    ("optimizer", "kind", "sgd"),
    ("optimizer", "betas", [0.9, 0.999]),
    ("optimizer", "warmup_steps", 0),
    ("probe", "gradient_norm_steps", []),
    ("probe", "batch_stats_every", 0),
    ("probe", "batch_stats_batches", 8),
    ("optimizer", "decay", "none"),
)


def _without_defaults(
    dumped: dict[str, Any], added: tuple[tuple[str, str, Any], ...]
) -> dict[str, Any]:
    """``dumped`` (changed in place) without the ``added`` fields that hold their
    default (section ``""``: the top level; a section that is absent or None is
    skipped), so that what was recorded before a field existed keeps its hash."""
    for section, field, default in added:
        table = dumped if section == "" else dumped.get(section)
        if isinstance(table, dict) and field in table and table[field] == default:
            del table[field]
    return dumped


class PointSpec(BaseModel):
    """Everything that determines one run's numbers (and nothing else)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    data_dir: str | None
    seed: int
    steps: int
    batch_size: int
    eval_every: int
    device: str
    model: ModelSpec
    optimizer: OptimizerSpec
    probe: ProbeSpec
    divergence: DivergenceSpec
    test_examples: int | None = None  # evaluate on the first N test examples (None: all)

    def identity(self) -> str:
        """16 hex digits of the SHA-256 of the canonical JSON of this spec.

        Fields added after identity version 1 are left out while they hold their
        default, so the points recorded before they existed keep their identity."""
        spec = _without_defaults(self.model_dump(mode="json"), _ADDED_FIELDS)
        payload = json.dumps(
            {"v": _IDENTITY_VERSION, **spec},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Point:
    """One grid point: where it sits in the grid, and what it trains."""

    id: str
    position: int
    network: str
    label: str
    seed: int
    axes: dict[str, Any]
    spec: PointSpec

    @property
    def name(self) -> str:
        """``network/axis=value/.../seed=S``: readable, for tables and run names."""
        parts = [self.network, *(f"{k.rpartition('.')[2]}={v}" for k, v in self.axes.items())]
        return "/".join([*parts, f"seed={self.seed}"])


def format_axes(axes: dict[str, Any]) -> str:
    """``lr=0.1, depth=4`` (the last part of each dotted key), or ``""``."""
    return ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in axes.items())


def _point_spec(
    config: ExperimentConfig, network: str, axes: dict[str, Any], seed: int
) -> PointSpec:
    raw = config.model_dump(exclude={"sweep", "claims", "battery"})  # none in a point
    for key, value in axes.items():
        raw = set_dotted(raw, key, value)
    resolved = ExperimentConfig.model_validate({**raw, "seeds": [seed]})
    steps, eval_every = resolved.resolved_steps()
    # The point records the rate it trains with (scaled with the batch, when asked).
    optimizer = resolved.optimizer.model_copy(
        update={"lr": resolved.resolved_lr(), "lr_reference_batch": None}
    )
    return PointSpec(
        dataset=resolved.dataset,
        data_dir=resolved.data_dir,
        seed=seed,
        steps=steps,
        batch_size=resolved.batch_size,
        eval_every=eval_every,
        device=resolved.device,
        model=resolved.networks[network].resolve(resolved.model),
        optimizer=optimizer,
        probe=resolved.probe,
        divergence=resolved.divergence,
        test_examples=resolved.test_examples,
    )


def expand_grid(config: ExperimentConfig) -> list[Point]:
    """Every point of ``config``: seeds x axis values x networks, in that nesting."""
    keys = list(config.sweep)
    combos = list(itertools.product(*(config.sweep[k] for k in keys)))
    points: list[Point] = []
    seen: dict[str, Point] = {}
    for seed in config.seeds:
        for combo in combos:
            axes = dict(zip(keys, combo, strict=True))
            for network, spec in config.networks.items():
                point_spec = _point_spec(config, network, axes, seed)
                twin = seen.get(point_spec.identity())
                if twin is not None:
                    raise ConfigError(
                        f"networks {twin.network!r} and {network!r} train the same point "
                        f"({format_axes(axes) or 'no axes'}, seed {seed}): they differ only in "
                        "their label; remove one or make them differ"
                    )
                points.append(
                    Point(
                        id=point_spec.identity(),
                        position=len(points),
                        network=network,
                        label=spec.label,
                        seed=seed,
                        axes=axes,
                        spec=point_spec,
                    )
                )
                seen[points[-1].id] = points[-1]
    return points


# (section, field, default as JSON) of the configuration fields added since experiment
# ids were last re-keyed (2026-12-06): left out of the id while they hold their default,
# so that an experiment recorded before a field existed keeps its id (and its report).
_ADDED_CONFIG_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("optimizer", "decay", "none"),
    ("battery", "where", {}),
)
# ... and of each claim (axis ends) and each network (its own init)
_ADDED_CLAIM_FIELDS: tuple[tuple[str, str, Any], ...] = (("", "axis_ends", {}),)
_ADDED_NETWORK_FIELDS: tuple[tuple[str, str, Any], ...] = (("", "init", None),)


def experiment_id(config: ExperimentConfig) -> str:
    """``<name>-<8 hex digits>``: the same configuration always has the same id.

    Fields added after an experiment was recorded are left out while they hold their
    default (as a point's identity leaves them out, :meth:`PointSpec.identity`)."""
    dumped = _without_defaults(config.model_dump(mode="json"), _ADDED_CONFIG_FIELDS)
    for claim in dumped.get("claims", []):
        _without_defaults(claim, _ADDED_CLAIM_FIELDS)
    for network in (dumped.get("networks") or {}).values():
        _without_defaults(network, _ADDED_NETWORK_FIELDS)
    payload = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return f"{config.name}-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"
