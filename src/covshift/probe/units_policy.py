"""What the user gives: the probe's ``unit_dim``, checked and read per layer.

:class:`UnitPolicy` is ``unit_dim`` once it has been checked: one axis for every
layer, ``"auto"``, or axes by module-name glob. It is rule 1 (``"given"``) of
:mod:`covshift.probe.units`, and says whether a forward must be traced for the
producer rules (:meth:`UnitPolicy.needs_trace`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from covshift.probe.select import glob_match
from covshift.probe.units_declared import layer_claim

__all__ = ["UnitDim", "UnitPolicy"]

UnitDim = int | str | Mapping[str, int | str]


def _check_axis(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where} must be an axis (an int such as 1 or -1) or 'auto', got "
            f"{type(value).__name__} {value!r}"
        )
    if value == 0:
        raise ValueError(f"{where} must not be 0 (the batch axis); use 1 or -1, or 'auto'")
    return int(value)


@dataclass(frozen=True)
class UnitPolicy:
    """The user's ``unit_dim``: one axis for every layer, ``"auto"``, or per-layer
    axes by module-name glob (first match wins; unmatched layers are ``"auto"``)."""

    everywhere: int | None = None  # an int for every layer; None: per pattern / auto
    patterns: tuple[tuple[str, int | None], ...] = ()  # (glob, axis or None: auto)

    @staticmethod
    def of(unit_dim: UnitDim) -> UnitPolicy:
        if isinstance(unit_dim, str):
            if unit_dim != "auto":
                raise ValueError(
                    f"unit_dim must be 'auto', an axis (1, -1, ...) or a mapping from "
                    f"layer-name patterns to axes, got {unit_dim!r}"
                )
            return UnitPolicy()
        if isinstance(unit_dim, Mapping):
            patterns = []
            for pattern, axis in unit_dim.items():
                if not isinstance(pattern, str) or not pattern:
                    raise TypeError(
                        f"unit_dim's keys must be layer-name patterns (strings), got {pattern!r}"
                    )
                where = f"unit_dim[{pattern!r}]"
                patterns.append((pattern, None if axis == "auto" else _check_axis(axis, where)))
            return UnitPolicy(None, tuple(patterns))
        return UnitPolicy(_check_axis(unit_dim, "unit_dim"))

    def given(self, name: str) -> tuple[int, str] | None:
        """The axis the user gives layer ``name`` and how (``"unit_dim=-1"``), or None
        (``"auto"``)."""
        if self.everywhere is not None:
            return self.everywhere, f"unit_dim={self.everywhere}"
        base = name.partition("#")[0]
        for pattern, axis in self.patterns:
            if glob_match(base, pattern):
                return None if axis is None else (axis, f"unit_dim[{pattern!r}]={axis}")
        return None

    def check_patterns(self, names: Sequence[str]) -> None:
        """Every pattern must match a watched layer (a typo would silently do nothing)."""
        for pattern, _ in self.patterns:
            if not any(glob_match(n, pattern) for n in names):
                raise ValueError(
                    f"unit_dim pattern {pattern!r} matches none of the watched layers "
                    f"({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
                )

    def needs_trace(self, modules: Mapping[str, nn.Module], record: str) -> bool:
        """Whether a watched layer may need what the forward shows: it says nothing
        itself (with a given axis: to check that axis against its producer's), or, left
        to ``"auto"``, its claim may not settle the axis."""
        for name, module in modules.items():
            claim = layer_claim(module, record)
            if claim is None:
                return True
            if self.given(name) is None and (claim.dim is None or claim.ambiguous_end):
                return True
        return False
