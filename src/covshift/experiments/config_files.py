"""Reading experiment configurations: shipped presets and TOML files, ``--set``
overrides, sizes (``quick``, ``full``), validated into an :class:`ExperimentConfig`
whose errors name the file and the field (:mod:`.config_errors`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from covshift.experiments.axes import flatten_sweep
from covshift.experiments.config import SWEEPABLE, ConfigError, ExperimentConfig
from covshift.experiments.config_errors import format_errors

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "PRESET_DIR",
    "apply_overrides",
    "apply_size",
    "load_config",
    "preset_names",
    "preset_path",
    "read_preset",
]

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    """Names of the presets shipped with covshift."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """The TOML file of a shipped preset, or the path itself if it is a ``.toml`` file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give the path of a .toml file")
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


def read_preset(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The file of a preset and its TOML table, unvalidated."""
    path = preset_path(name_or_path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return path, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a size's overrides, as ``--set`` keys)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def apply_size(path: Path, raw: dict[str, Any], size: str) -> dict[str, Any]:
    """``raw`` with the overrides of its size ``size`` applied (and ``size`` recorded)."""
    sizes = raw.get("sizes")
    if not isinstance(sizes, dict) or size not in sizes:
        names = ", ".join(sizes) if isinstance(sizes, dict) else "none"
        raise ConfigError(f"{path}: has no size {size!r}; its sizes: {names}")
    table = sizes[size]
    changes_table = table.get("set", {}) if isinstance(table, dict) else {}
    if not isinstance(table, dict) or not isinstance(changes_table, dict):
        raise ConfigError(
            f"{path}: sizes.{size} must be a table with a [sizes.{size}.set] table of the "
            "fields it changes (e.g. set.steps = 1000)"
        )
    changes = _flatten(changes_table)
    if "seeds" in changes or "seed" in changes:
        raw = {k: v for k, v in raw.items() if k not in ("seed", "seeds")}
    if "examples" in changes:
        raw = {k: v for k, v in raw.items() if k != "steps"}
    if "steps" in changes:
        raw = {k: v for k, v in raw.items() if k != "examples"}
    # An axis in a size replaces the preset's axis whole (it is a leaf of the table).
    return {**apply_overrides(raw, changes), "size": size}


def load_config(
    name_or_path: str, overrides: dict[str, Any] | None = None, *, size: str | None = None
) -> ExperimentConfig:
    """Read a preset (shipped name or .toml path), apply dotted overrides, validate.

    ``size`` applies one of the preset's ``[sizes.<name>]`` first (``quick``, ``full``).
    ``seeds`` in the overrides replaces the preset's ``seeds`` (or ``seed``). A field
    that the preset sweeps cannot be overridden by itself: override the axis
    (``sweep.optimizer.lr=[0.1]``).

    Raises:
        ConfigError: unreadable TOML (with the file and position) or invalid fields
            (each with its dotted path and what is accepted).
    """
    path, raw = read_preset(name_or_path)
    if size is not None:
        raw = apply_size(path, raw, size)
    overrides = dict(overrides or {})
    if "seeds" in overrides or "seed" in overrides:
        raw = {k: v for k, v in raw.items() if k not in ("seed", "seeds")}
    swept = raw.get("sweep")
    if isinstance(swept, dict):
        try:
            axes = flatten_sweep(swept, SWEEPABLE)
        except ValueError as e:
            raise ConfigError(f"{path}: invalid configuration:\n  {e}") from None
        for key in overrides:
            if key in axes:
                raise ConfigError(
                    f"--set {key}: {path} sweeps {key} over {axes[key]}; override the axis "
                    f"instead (--set sweep.{key}=[...])"
                )
    raw = apply_overrides(raw, overrides)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        origin = f"{path} with overrides {', '.join(overrides)}" if overrides else str(path)
        raise ConfigError(
            f"{origin}: invalid configuration:\n{format_errors(e, ExperimentConfig)}"
        ) from None
