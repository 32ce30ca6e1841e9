"""When a probe records: every ``k`` steps, or at an explicit list of steps."""

from __future__ import annotations

from collections.abc import Iterable


class Schedule:
    """Decides which training steps get a record.

    Args:
        every: record at steps 0, k, 2k, ... (step 0 is the initialization).
        steps: an explicit, increasing list of steps instead of ``every``.

    Exactly one of ``every`` and ``steps`` must be given.
    """

    def __init__(self, every: int | None = None, steps: Iterable[int] | None = None) -> None:
        if (every is None) == (steps is None):
            raise ValueError("Schedule needs exactly one of every=k or steps=[...]")
        self.every = every
        self.steps: frozenset[int] | None = None
        if every is not None and every < 1:
            raise ValueError(f"Schedule every must be a positive number of steps, got {every}")
        if steps is not None:
            listed = list(steps)
            if not listed or any(s < 0 for s in listed):
                raise ValueError(
                    f"Schedule steps must be a non-empty list of steps >= 0, got {listed}"
                )
            self.steps = frozenset(listed)

    def due(self, step: int) -> bool:
        """Whether ``step`` gets a record."""
        if self.steps is not None:
            return step in self.steps
        assert self.every is not None
        return step % self.every == 0

    def __repr__(self) -> str:
        if self.steps is not None:
            return f"Schedule(steps={sorted(self.steps)})"
        return f"Schedule(every={self.every})"
