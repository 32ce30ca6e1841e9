"""The probe's settings, declared once (PEP 692): what ShiftProbe and the trainer
callbacks take as keyword arguments, with their types and defaults.

:class:`~covshift.probe.ShiftProbe` takes ``**settings: Unpack[ProbeSettings]``; the
trainer callbacks (:mod:`covshift.integrations`) take the same :class:`RecordSettings`
and :class:`ScheduleSettings` among their own, so adding a probe option means adding
it here (and to ShiftProbe's docstring), not to four signatures. A type checker sees
every keyword with its type; at run time :func:`resolve` refuses a keyword that is
not declared, as Python does for a named parameter, and fills in the defaults.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict

from covshift.probe.record import RecordSink
from covshift.probe.schedule import Schedule
from covshift.probe.units import UnitDim

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10: typing_extensions comes with torch
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_QUANTILES",
    "PROBE_DEFAULTS",
    "ProbeSettings",
    "RecordSettings",
    "ScheduleSettings",
    "Unpack",
    "resolve",
]

DEFAULT_QUANTILES = (0.15, 0.5, 0.85)


class ScheduleSettings(TypedDict, total=False):
    """When to record: ``every`` k steps (default 100), explicit ``steps``, or a
    :class:`~covshift.probe.schedule.Schedule`."""

    every: int | None
    steps: Iterable[int] | None
    schedule: Schedule | None


class RecordSettings(TypedDict, total=False):
    """What a record holds and how its values are taken (see ShiftProbe's docstring)."""

    record: Literal["input", "output"]
    source: Literal["probe", "train"]
    mode: Literal["eval", "train"]
    quantiles: Sequence[float]
    bins: int
    unit_histograms: bool
    pooled_quantiles: bool
    saturation_slope: float
    unit_dim: UnitDim
    background: bool | None


class ProbeSettings(RecordSettings, ScheduleSettings, total=False):
    """Every keyword argument of :class:`~covshift.probe.ShiftProbe`: the record's and
    the schedule's settings, the reduction across ranks, and the sink."""

    reduce: bool | None
    process_group: Any
    sink: RecordSink | None


#: ShiftProbe's defaults; a key not given takes its value from here.
PROBE_DEFAULTS: ProbeSettings = {
    "every": None,
    "steps": None,
    "schedule": None,
    "record": "input",
    "source": "probe",
    "mode": "eval",
    "quantiles": DEFAULT_QUANTILES,
    "bins": 40,
    "unit_histograms": False,
    "pooled_quantiles": False,
    "saturation_slope": 0.05,
    "unit_dim": "auto",
    "reduce": None,
    "process_group": None,
    "background": None,
    "sink": None,
}


def resolve(
    given: Mapping[str, Any], declared: type, defaults: Mapping[str, Any], owner: str
) -> dict[str, Any]:
    """``defaults`` updated with ``given``; TypeError, worded as Python words it for a
    named parameter, for a key that the TypedDict ``declared`` (with its bases) does
    not declare."""
    known = declared.__required_keys__ | declared.__optional_keys__  # type: ignore[attr-defined]
    for key in given:
        if key not in known:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}")
    return {**defaults, **given}
