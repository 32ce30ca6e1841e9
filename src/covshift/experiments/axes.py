"""Sweep axes: which configuration fields a grid may vary, and how they are written.

In a preset, ``[sweep]`` lists axes as TOML dotted keys, each with a non-empty array of
values; the grid is their product with the networks and the seeds::

    seeds = 3
    [sweep]
    optimizer.lr = [0.05, 0.2, 0.8]
    model.depth = [2, 4, 8]
    batch_size = [16, 64]

Any field of ``model``, ``optimizer``, ``probe`` and ``divergence`` can be an axis
(and ``model.norm_kwargs.<name>``), and so can the data and loop fields ``dataset``,
``data_dir``, ``steps``, ``batch_size``, ``eval_every``, ``examples``,
``eval_examples`` and ``device``. The axes are
kept flat, by dotted key, in the order they are written.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

__all__ = ["LOOP_AXES", "closest", "flatten_sweep", "set_dotted"]

LOOP_AXES = (
    "dataset",
    "data_dir",
    "steps",
    "batch_size",
    "eval_every",
    "examples",
    "eval_examples",
    "test_examples",
    "device",
)


def closest(name: str, choices: list[str]) -> str:
    """``" (did you mean X?)"`` for the nearest choice, or ``""``."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _unknown(key: str, name: str, choices: list[str]) -> ValueError:
    return ValueError(
        f"{key}: {name!r} is not a field that can be swept{closest(name, choices)}; "
        f"accepted: {', '.join(choices)}"
    )


def flatten_sweep(raw: Any, sections: Mapping[str, list[str]]) -> dict[str, list[Any]]:
    """Flatten a ``[sweep]`` table to ``{dotted key: values}``, checking every key.

    Args:
        raw: the table as read from TOML (nested by dotted keys) or already flat.
        sections: the section names that can be swept into (``model`` ...) and their
            fields.

    Raises:
        ValueError: an unknown key (with the accepted ones and the closest match), a
            value that is not a non-empty array, or repeated values; the message starts
            with the key (``sweep.optimizer.lr``).
    """
    if not isinstance(raw, Mapping):
        raise ValueError("sweep must be a table of axes, e.g. [sweep] optimizer.lr = [0.1, 0.5]")
    flat: dict[str, list[Any]] = {}
    top = sorted([*LOOP_AXES, *sections])
    for name, value in raw.items():
        head, _, rest = str(name).partition(".")
        if rest:  # an already-dotted key ("optimizer.lr": [...]), e.g. from Python
            value, name = {rest: value}, head
        if name in LOOP_AXES:
            flat[name] = _values(f"sweep.{name}", value)
        elif name in sections:
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"sweep.{name}: expected a table of {name} fields "
                    f"(e.g. sweep.{name}.{sections[name][0]} = [...]), got {value!r}"
                )
            _flatten_section(name, value, sections[name], flat)
        else:
            raise _unknown(f"sweep.{name}", name, top)
    return flat


def _flatten_section(
    section: str, table: Mapping[str, Any], fields: list[str], flat: dict[str, list[Any]]
) -> None:
    for field, value in table.items():
        key = f"sweep.{section}.{field}"
        head, _, rest = str(field).partition(".")
        if field not in fields and head == "norm_kwargs" and rest:
            value, field = {rest: value}, head
        if field not in fields:
            raise _unknown(key, field, sorted(fields))
        if field == "norm_kwargs" and isinstance(value, Mapping):
            # One axis per norm keyword: sweep.model.norm_kwargs.momentum = [0.1, 0.01]
            for kw, values in value.items():
                flat[f"{section}.norm_kwargs.{kw}"] = _values(f"{key}.{kw}", values)
        else:
            flat[f"{section}.{field}"] = _values(key, value)


def _values(key: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}: an axis is an array of values, e.g. [0.1, 0.5]; got {value!r}")
    if not value:
        raise ValueError(f"{key}: the axis is empty; give at least one value")
    seen: list[Any] = []
    for v in value:
        if v in seen:
            raise ValueError(f"{key}: value {v!r} appears twice")
        seen.append(v)
    return list(value)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of the nested mapping ``raw`` with ``dotted`` (``model.depth``) set."""
    out = dict(raw)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, Mapping) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return out
