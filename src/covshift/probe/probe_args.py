"""ShiftProbe's arguments, checked before anything is attached to the model.

:class:`~covshift.probe.ShiftProbe` fails at construction, with a message that says
what to pass instead, when its arguments cannot work together: how values are taken
(``record``, ``source``, ``mode``, ``background``), the probe batch that ``source``
needs (or must not have), and what the statistics ask for (``quantiles``, ``bins``,
``saturation_slope``). The unit axis (``unit_dim``), the schedule and the layers are
checked by their own modules (:class:`~covshift.probe.units.UnitPolicy`,
:class:`~covshift.probe.schedule.Schedule`, :func:`~covshift.probe.select.select_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from covshift.probe.batch import ProbeBatch

__all__ = ["check_modes", "check_statistics", "probe_batch"]


def check_modes(record: str, source: str, mode: str, background: bool | None) -> None:
    """Raise ValueError unless ``record``, ``source``, ``mode`` and ``background`` are
    valid and go together."""
    if record not in ("input", "output"):
        raise ValueError(f"record must be 'input' or 'output', got {record!r}")
    if source not in ("probe", "train"):
        raise ValueError(
            f"source must be 'probe' (a fixed probe batch) or 'train' (the live "
            f"training batches), got {source!r}"
        )
    if mode not in ("eval", "train"):
        raise ValueError(
            f"mode must be 'eval' (running statistics) or 'train' (the probe batch's "
            f"own statistics), got {mode!r}"
        )
    if background and mode == "train":
        raise ValueError(
            "mode='train' records on the training thread (its buffers are restored "
            "after each record); drop background=True"
        )
    if background and source == "train":
        raise ValueError(
            "background=True records the probe batch on a snapshot of the model; with "
            "source='train' the values come from the training forward itself: drop it"
        )


def probe_batch(probe_input: Any, source: str) -> ProbeBatch | None:
    """The probe batch of ``probe_input``: required with ``source="probe"``, None (and
    ``probe_input`` must be None) with ``source="train"``."""
    if source == "train":
        if probe_input is not None:
            raise ValueError(
                "probe_input must be None with source='train' (the training batches "
                "are recorded); drop it, or use source='probe'"
            )
        return None
    if probe_input is None:
        raise ValueError(
            "probe_input is needed with source='probe' (the default): pass a fixed "
            "batch of shape (N, ...) such as x_test[:1000], or source='train' to "
            "record the live training batches"
        )
    return ProbeBatch.of(probe_input)


def check_statistics(
    quantiles: Sequence[float], bins: int, saturation_slope: float
) -> tuple[float, ...]:
    """The quantile levels as floats; ValueError unless they increase in [0, 1],
    ``bins`` is a whole number >= 0 and ``saturation_slope`` a fraction in (0, 1)."""
    quantiles = tuple(float(q) for q in quantiles)
    if not all(0.0 <= q <= 1.0 for q in quantiles) or list(quantiles) != sorted(quantiles):
        raise ValueError(f"quantiles must be increasing levels in [0, 1], got {list(quantiles)}")
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 0:
        raise ValueError(f"bins must be a whole number >= 0 (0: no histogram), got {bins!r}")
    if not 0.0 < saturation_slope < 1.0:
        raise ValueError(f"saturation_slope must be a fraction in (0, 1), got {saturation_slope!r}")
    return quantiles
