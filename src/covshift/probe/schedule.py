"""When a probe records: every ``k`` steps, at an explicit list of steps, or log-spaced."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

__all__ = ["Schedule"]


def _is_step(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Schedule:
    """Decides which training steps get a record.

    Args:
        every: record at steps 0, k, 2k, ... (step 0 is the initialization).
        steps: an explicit list of steps (whole numbers >= 0) instead of ``every``.

    Exactly one of ``every`` and ``steps`` must be given; :meth:`logspace` builds a
    log-spaced list (dense early, when distributions move fastest).
    """

    def __init__(self, every: int | None = None, steps: Iterable[int] | None = None) -> None:
        if (every is None) == (steps is None):
            raise ValueError("Schedule needs exactly one of every=k or steps=[...]")
        self.every = every
        self.steps: frozenset[int] | None = None
        if every is not None and (not _is_step(every) or every < 1):
            raise ValueError(
                f"Schedule every must be a positive number of steps (a whole number >= 1), "
                f"got {every!r}"
            )
        if steps is not None:
            if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
                raise ValueError(
                    f"Schedule steps must be a non-empty list of steps >= 0, got {steps!r}"
                )
            listed = list(steps)
            if not listed or any(not _is_step(s) or s < 0 for s in listed):
                raise ValueError(
                    f"Schedule steps must be a non-empty list of steps >= 0, got {listed}"
                )
            self.steps = frozenset(int(s) for s in listed)

    @classmethod
    def logspace(cls, last: int, num: int = 50, *, first: int = 1, zero: bool = True) -> Schedule:
        """About ``num`` steps spaced evenly in ``log(step)`` from ``first`` to ``last``
        (rounded, duplicates removed), plus step 0 when ``zero``.

        Example: ``Schedule.logspace(10_000, num=5)`` records at 0, 1, 10, 100, 1000, 10000.
        """
        if not _is_step(last) or not _is_step(first) or not 1 <= first <= last:
            raise ValueError(
                f"Schedule.logspace needs whole numbers 1 <= first <= last, "
                f"got first={first!r}, last={last!r}"
            )
        if not _is_step(num) or num < 1:
            raise ValueError(f"Schedule.logspace num must be a whole number >= 1, got {num!r}")
        if num == 1 or first == last:
            points = [last]
        else:
            points = np.geomspace(first, last, num).round().astype(np.int64).tolist()
        return cls(steps=sorted({*([0] if zero else []), *points}))

    @classmethod
    def resolve(
        cls,
        every: int | None = None,
        steps: Iterable[int] | None = None,
        schedule: Schedule | None = None,
        *,
        default_every: int = 100,
    ) -> Schedule:
        """The schedule meant by a probe's ``every`` / ``steps`` / ``schedule`` arguments
        (at most one given; none means every ``default_every`` steps)."""
        if sum(x is not None for x in (every, steps, schedule)) > 1:
            raise ValueError("give only one of every=k, steps=[...] or schedule=Schedule(...)")
        if schedule is not None:
            if not isinstance(schedule, Schedule):
                raise ValueError(f"schedule must be a covshift.probe.Schedule, got {schedule!r}")
            return schedule
        if steps is not None:
            return cls(steps=steps)
        return cls(every=default_every if every is None else every)

    def due(self, step: int) -> bool:
        """Whether ``step`` gets a record."""
        if self.steps is not None:
            return step in self.steps
        assert self.every is not None
        return step % self.every == 0

    def count(self, last: int) -> int:
        """How many records steps 0..``last`` get."""
        if self.steps is not None:
            return sum(1 for s in self.steps if s <= last)
        assert self.every is not None
        return math.floor(last / self.every) + 1 if last >= 0 else 0

    def __repr__(self) -> str:
        if self.steps is not None:
            shown = sorted(self.steps)
            text = (
                str(shown) if len(shown) <= 12 else f"[{shown[0]}, ..., {shown[-1]}] ({len(shown)})"
            )
            return f"Schedule(steps={text})"
        return f"Schedule(every={self.every})"
