"""An experiment configuration written back as TOML (``covshift check`` prints it).

The text is the resolved configuration (the preset with its size and overrides
applied, every default spelled out), so ``covshift run`` of the file trains the very
same grid under the same experiment id. TOML has no null: a field whose value is None
is left out, which is exact when None is what the field reads as when absent (its
default); any other None is reported as lost rather than written wrong.
"""

from __future__ import annotations

import sys
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import experiment_id

__all__ = ["config_to_toml"]


def _none_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the None values in a JSON-like tree (list items as ``[i]``)."""
    if value is None:
        return [prefix]
    if isinstance(value, dict):
        return [
            p
            for k, v in value.items()
            for p in _none_paths(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _none_paths(v, f"{prefix}[{i}]")]
    return []


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


def _at(tree: Any, path: str) -> Any:
    """The value at a dotted path of :func:`_none_paths` (None where it is missing)."""
    node = tree
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            index = int(part[1:-1])
            node = node[index] if isinstance(node, list) and index < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def config_to_toml(config: ExperimentConfig) -> tuple[str, list[str]]:
    """``(text, lost)``: the TOML of ``config`` and the dotted fields whose None value
    it cannot carry (empty: reading the text gives ``config`` back exactly)."""
    data = config.model_dump(mode="json")
    text = tomli_w.dumps(_without_none(data))
    reread = ExperimentConfig.model_validate(tomllib.loads(text))
    again = reread.model_dump(mode="json")
    lost = [p for p in _none_paths(data) if _at(again, p) is not None or p.endswith("]")]
    if not lost and experiment_id(reread) != experiment_id(config):
        raise RuntimeError(  # a bug of this writer, never a user's mistake
            f"the TOML of {experiment_id(config)} reads back as {experiment_id(reread)}"
        )
    return text, lost
