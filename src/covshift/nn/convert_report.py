"""What a conversion did: :class:`ConversionReport`, one :class:`ConversionEntry` per
module replaced or skipped, and the :class:`ConversionWarning` that
:func:`covshift.nn.convert` issues when state was lost."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConversionEntry", "ConversionReport", "ConversionWarning"]


class ConversionWarning(UserWarning):
    """Raised as a warning by :func:`convert` when a conversion loses state."""


@dataclass
class ConversionEntry:
    """One replaced (or skipped) module.

    Attributes:
        path: its dotted path in the model (``""`` for the root).
        source: the class name replaced, e.g. ``"BatchNorm2d"``.
        target: the class name put in its place (``""`` when skipped).
        carried: state carried over (``"weight"``, ``"running_mean"``, ``"eps"``, ...).
        dropped: state that could not be carried, each with the reason.
        notes: behaviour differences worth knowing (layout, guessed dims, ...).
    """

    path: str
    source: str
    target: str
    carried: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = self.path or "<root>"
        line = f"{where}: {self.source} -> {self.target or '(skipped)'}"
        if self.dropped:
            line += f"; dropped: {'; '.join(self.dropped)}"
        if self.notes:
            line += f"; notes: {'; '.join(self.notes)}"
        return line


@dataclass
class ConversionReport:
    """What a conversion did: one :class:`ConversionEntry` per module touched."""

    entries: list[ConversionEntry] = field(default_factory=list)

    @property
    def replaced(self) -> list[ConversionEntry]:
        return [e for e in self.entries if e.target]

    @property
    def skipped(self) -> list[ConversionEntry]:
        return [e for e in self.entries if not e.target]

    @property
    def lossy(self) -> list[ConversionEntry]:
        """Entries that dropped state (or were skipped)."""
        return [e for e in self.entries if e.dropped or not e.target]

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        if not self.entries:
            return "no normalization layer found"
        return "\n".join(str(e) for e in self.entries)
