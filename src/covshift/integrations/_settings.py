"""The trainer callbacks' settings, declared once: ShiftProbe's record and schedule
settings (:mod:`covshift.probe.settings`) and the session's own, with their defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from covshift.integrations._store_run import StoreSpec
from covshift.probe._copies import LossFn
from covshift.probe.select import LayerSpec
from covshift.probe.settings import PROBE_DEFAULTS, RecordSettings, ScheduleSettings

__all__ = [
    "CALLBACK_DEFAULTS",
    "PROBE_OPTIONS",
    "SET_BY_SESSION",
    "CallbackSettings",
    "SessionSettings",
]

#: What the session sets on its ShiftProbe itself (a trainer's callback may not).
SET_BY_SESSION = frozenset(("model", "sink", "reduce", "process_group"))
#: ShiftProbe's settings the session records as "options" in the run row.
PROBE_OPTIONS = frozenset(
    ("quantiles", "bins", "unit_histograms", "pooled_quantiles", "saturation_slope")
)


class CallbackSettings(RecordSettings, ScheduleSettings, total=False):
    """The keyword arguments every trainer callback takes (see :class:`ProbeSession`):
    ShiftProbe's record and schedule settings (:mod:`covshift.probe.settings`), and the
    session's own."""

    probe_size: int | None
    grad_ics: bool
    grad_ics_every: int | None
    grad_ics_layers: LayerSpec | Sequence[LayerSpec] | None
    grad_ics_loss: LossFn | None
    store: StoreSpec
    run_name: str | None
    log_shift: bool
    prefix: str


class SessionSettings(CallbackSettings, total=False):
    """:class:`CallbackSettings` and the targets of a given probe batch."""

    probe_target: Any


#: The defaults of the callbacks: ShiftProbe's, except ``background`` (False: records
#: reach the loggers at their own step only when taken on the training thread, since
#: the trainers label logged values by their current step).
CALLBACK_DEFAULTS: SessionSettings = {
    **{k: v for k, v in PROBE_DEFAULTS.items() if k not in SET_BY_SESSION},  # type: ignore[typeddict-item]
    "background": False,
    "probe_target": None,
    "probe_size": None,
    "grad_ics": False,
    "grad_ics_every": None,
    "grad_ics_layers": None,
    "grad_ics_loss": None,
    "store": None,
    "run_name": None,
    "log_shift": True,
    "prefix": "covshift",
}
