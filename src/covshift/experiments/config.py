"""The experiment configuration schema (pydantic), read from TOML presets.

An experiment trains several *networks* that share one model spec and differ only in
the fields each network overrides (e.g. ``norm``), on the same data, batches and
initial weights. Every field is validated; unknown fields are errors, so a typo in a
preset or in ``--set`` is caught with the field's path in the message.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ClaimSpec",
    "ConfigError",
    "ExperimentConfig",
    "ModelSpec",
    "NetworkSpec",
    "OptimizerSpec",
    "ProbeSpec",
    "ReportSpec",
    "apply_overrides",
    "load_config",
    "preset_names",
    "preset_path",
]

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(Exception):
    """A preset or an override is invalid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """The network architecture (see :func:`covshift.models.build_mlp` / ``build_cnn``)."""

    kind: Literal["mlp", "cnn"] = "mlp"
    width: int = Field(100, ge=1)
    depth: int = Field(3, ge=1)
    channels: tuple[int, ...] = (16, 32, 64)
    activation: Literal["sigmoid", "tanh", "relu"] = "sigmoid"
    norm: str = "none"
    norm_position: Literal["before", "after"] = "before"
    init: Literal["gaussian", "xavier", "he", "torch"] = "gaussian"
    init_std: float = Field(0.1, gt=0)
    norm_kwargs: dict[str, float | int | bool | str | None] = Field(default_factory=dict)

    @field_validator("norm")
    @classmethod
    def _known_norm(cls, value: str) -> str:
        from covshift.nn import norm_names

        if value != "none" and value not in norm_names():
            raise ValueError(
                f"unknown normalization {value!r}; use none or one of {', '.join(norm_names())}"
            )
        return value


class NetworkSpec(_Strict):
    """One network of an experiment: a label and the model fields it overrides."""

    label: str
    norm: str | None = None
    norm_position: Literal["before", "after"] | None = None
    activation: Literal["sigmoid", "tanh", "relu"] | None = None
    init_std: float | None = Field(None, gt=0)
    norm_kwargs: dict[str, float | int | bool | str | None] | None = None

    def resolve(self, base: ModelSpec) -> ModelSpec:
        """``base`` with this network's overrides applied (validated again)."""
        updates = self.model_dump(exclude={"label"}, exclude_none=True)
        return ModelSpec.model_validate({**base.model_dump(), **updates})


class OptimizerSpec(_Strict):
    """SGD settings."""

    lr: float = Field(0.5, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class ProbeSpec(_Strict):
    """What the probe records (see :class:`covshift.probe.ShiftProbe`)."""

    layers: tuple[str, ...] = ("hidden.*.act",)
    record: Literal["input", "output"] = "input"
    every: int = Field(100, ge=1)
    examples: int = Field(1000, ge=2)
    quantiles: tuple[float, ...] = (0.15, 0.5, 0.85)

    @field_validator("quantiles")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if (
            len(value) < 2
            or list(value) != sorted(set(value))
            or not 0 <= value[0] <= value[-1] <= 1
        ):
            raise ValueError("quantiles must be at least two increasing levels in [0, 1]")
        return value


class ReportSpec(_Strict):
    """What the report shows."""

    checkpoints: tuple[int, ...] = (1000, 5000, 10000)
    layer: str | None = None  # layer of the percentile panels; default: last probed layer
    unit: int | None = Field(None, ge=0)  # unit of the percentile panels; default: typical


class ClaimSpec(_Strict):
    """A claim of the paper, tested on the headline numbers.

    ``metric`` is a ``/``-separated path into a network's summary (for example
    ``test_accuracy/1000`` or ``drift/hidden.2.act``); the claim holds when network
    ``better``'s value compares to network ``than``'s as ``direction`` says: strictly
    ``higher`` or ``lower``, or ``not_lower`` / ``not_higher`` (ties hold).
    """

    text: str
    metric: str
    better: str
    than: str
    direction: Literal["higher", "lower", "not_lower", "not_higher"]


class ExperimentConfig(_Strict):
    """A whole experiment, as read from a preset and overridden from the command line."""

    name: str
    title: str
    description: str = ""
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    seed: int = 0
    steps: int = Field(50_000, ge=1)
    batch_size: int = Field(60, ge=1)
    eval_every: int = Field(500, ge=1)
    device: str = "auto"
    model: ModelSpec = ModelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    probe: ProbeSpec = ProbeSpec()
    report: ReportSpec = ReportSpec()
    networks: dict[str, NetworkSpec]
    # Settings the paper leaves open: setting -> why this value (printed in the report).
    choices: dict[str, str] = Field(default_factory=dict)
    claims: tuple[ClaimSpec, ...] = ()

    @model_validator(mode="after")
    def _networks_resolve(self) -> ExperimentConfig:
        if not self.networks:
            raise ValueError("networks: at least one network is needed")
        for key, net in self.networks.items():
            try:
                net.resolve(self.model)
            except ValidationError as e:
                raise ValueError(f"networks.{key}: {_first_error(e)}") from None
        for i, claim in enumerate(self.claims):
            for role in ("better", "than"):
                if getattr(claim, role) not in self.networks:
                    raise ValueError(
                        f"claims[{i}].{role}: {getattr(claim, role)!r} is not a "
                        f"network; networks: {', '.join(self.networks)}"
                    )
        return self


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def preset_names() -> list[str]:
    """Names of the presets shipped with covshift."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """The TOML file of a shipped preset, or the path itself if it is a ``.toml`` file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {name_or_path!r}; shipped presets: "
            f"{', '.join(preset_names())} (or give a path to a .toml file)"
        )
    return path


def _parse_value(text: str) -> Any:
    """An override value in TOML syntax (numbers, booleans, quoted strings, arrays);
    anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``optimizer.lr``) in a raw config mapping; returns a new mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = _parse_value(value) if isinstance(value, str) else value
    return out


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a preset (shipped name or .toml path), apply dotted overrides, validate.

    Raises:
        ConfigError: unreadable TOML (with the file and position) or invalid fields
            (each with its dotted path and what is accepted).
    """
    path = preset_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    raw = apply_overrides(raw, overrides or {})
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        origin = f"{path} with overrides {', '.join(overrides)}" if overrides else str(path)
        raise ConfigError(f"{origin}: invalid configuration:\n{_format_errors(e)}") from None
