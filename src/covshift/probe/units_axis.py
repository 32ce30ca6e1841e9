"""The record of where a layer's units are: :class:`UnitAxis`, and its errors.

A :class:`UnitAxis` is what every probe record carries about its units: the axis, how
many units it holds, which rule found it (its ``source``, one of :data:`SOURCES`) and
why, in words. The rules themselves are in :mod:`covshift.probe.units`; this module
also holds the few words they are all written in (a shape as ``(N, 7, 768)``, an axis
of it), so that every rule reads the same in a record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SOURCES", "UnitAxis", "UnitAxisError", "UnitAxisWarning", "store_columns"]

SOURCES = ("given", "layer", "producer", "only", "assumed")


class UnitAxisError(ValueError):
    """A given unit axis does not exist in a layer's values (raised as is by the
    probe's forward, not taken for a probe batch that does not fit)."""


class UnitAxisWarning(UserWarning):
    """A layer's unit axis was assumed, or what the user gave contradicts the layer."""


@dataclass(frozen=True)
class UnitAxis:
    """The axis of a recorded tensor that holds the units, and how it was found.

    Attributes:
        dim: the axis, counted from 0 (the batch axis) in the recorded tensor.
        size: the number of units (the tensor's size along ``dim``).
        source: ``"given"``, ``"layer"``, ``"producer"``, ``"only"`` or ``"assumed"``
            (see :mod:`covshift.probe.units`).
        rule: why, in words (``"LayerNorm.normalized_shape=(768,): axis 2 (last) of
            (N, 7, 768)"``).
        doubt: why this axis may be wrong (an assumption, or a contradiction between
            the user's axis and the layer's); empty when there is none.
    """

    dim: int
    size: int
    source: str
    rule: str
    doubt: str = ""

    def __str__(self) -> str:
        return f"axis {self.dim} ({self.source}: {self.rule})"


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(["N", *(str(s) for s in shape[1:])]) + ")"


def _axis_text(dim: int, shape: Sequence[int]) -> str:
    last = " (last)" if dim == len(shape) - 1 and len(shape) > 2 else ""
    return f"axis {dim}{last} of {_shape_text(shape)}"


def store_columns(axis: UnitAxis | None) -> dict[str, Any]:
    """``Store.log_probe``'s keyword arguments for a record's unit axis."""
    if axis is None:
        return {}
    return {"unit_dim": axis.dim, "unit_source": axis.source, "unit_rule": axis.rule}
