"""Validation errors as a user reads them: one line per error, naming the field by its
path in the TOML (``networks.bn.widht``, ``claims[0].rule``), saying what was given
where a type was wrong (types are strict: ``true`` is not 1, ``"8"`` is not 8), and
for an unknown key listing the valid keys of its section with the closest one."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from covshift.experiments.axes import closest

__all__ = ["first_error", "format_errors"]


def _where(err: Any) -> str:
    """``claims[0].rule`` from pydantic's ``("claims", 0, "rule")``."""
    out = ""
    for part in err["loc"]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# pydantic's type errors, and how to say what was given instead
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
}


def _given(value: Any) -> str:
    """How TOML would have written ``value``, and what kind of value it is."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f'"{value}" (a string: drop the quotes if a number or boolean was meant)'
    if isinstance(value, float):
        return f"{value!r} (a number with a fraction)"
    return f"{value!r} ({type(value).__name__})"


def _message(err: Any, root: type[BaseModel]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field" + _suggestion(err, root)
    elif err["type"] in _EXPECTED:
        # Types are strict (no true -> 1, no "8" -> 8): say what was given.
        msg = f"expected {_EXPECTED[err['type']]}, got {_given(err.get('input'))}"
    return msg


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation is, directly or as ``Model | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _model_in(arg) is not None:
                return _model_in(arg)
    return None


def _step(annotation: Any, part: str | int) -> Any:
    """The annotation one location part below ``annotation`` (a model's field, a dict's
    value, a tuple's item), or None where the path leaves the schema."""
    model = _model_in(annotation)
    if model is not None:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (tuple, list) and args:
        return args[0]
    if len(args) == 1:  # Container | None
        return _step(args[0], part)
    return None


def _suggestion(err: Any, root: type[BaseModel]) -> str:
    """For an unknown field: the valid fields of its section and the closest one."""
    loc = list(err["loc"])
    name = str(loc[-1]) if loc else ""
    annotation: Any = root
    for part in loc[:-1]:
        annotation = _step(annotation, part)
        if annotation is None:
            return ""
    section = _model_in(annotation)
    if section is None:
        return ""
    fields = list(section.model_fields)
    return f"{closest(name, fields)}; valid keys here: {', '.join(fields)}"


def first_error(e: ValidationError, root: type[BaseModel]) -> str:
    """The first error of ``e`` in one line: where (``claims[0].rule``) and what; an
    unknown field with the valid keys of its section of ``root`` (the model validated)."""
    err = e.errors()[0]
    where = _where(err)
    return f"{where}: {_message(err, root)}" if where else _message(err, root)


def format_errors(e: ValidationError, root: type[BaseModel]) -> str:
    """Every error of ``e``, one indented line each (as :func:`first_error`)."""
    lines = []
    for err in e.errors():
        where = _where(err)
        msg = _message(err, root)
        lines.append(f"  {where}: {msg}" if where else f"  {msg}")
    return "\n".join(lines)
