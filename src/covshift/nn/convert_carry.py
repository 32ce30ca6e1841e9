"""Replacing a model's layers (:func:`replace_modules`, the walk of convert and sync), and
carrying a layer's state into its replacement: device, dtype and mode; weight, bias and
running statistics where shapes agree; eps and momentum unless passed; every drop (not
an identity affine, not fresh statistics) recorded in a :class:`ConversionEntry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class ConversionWarning(UserWarning):
    """Raised as a warning by :func:`convert` when a conversion loses state."""


@dataclass
class ConversionEntry:
    """One replaced (or skipped) module: its dotted ``path`` (``""``: the root), the
    ``source`` class name and the ``target`` one (``""`` when skipped), the state
    ``carried`` (``"weight"``, ``"eps"``, ...) and ``dropped`` (each with the reason), and
    ``notes`` on behaviour differences worth knowing (layout, guessed dims, ...)."""

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


_CONSUMED = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def replace_modules(
    root: nn.Module, swap: Callable[[nn.Module, str], nn.Module | None]
) -> nn.Module:
    """Apply ``swap(module, path)`` to ``root`` and below: a module it returns takes the
    place of the one given (the same module: left as it is), and its children are not
    visited; None visits the children. A module shared by several parents is swapped
    once. Returns ``root`` or its replacement."""
    done: dict[int, nn.Module | None] = {}

    def visit(m: nn.Module, path: str) -> nn.Module:
        if id(m) not in done:
            done[id(m)] = swap(m, path)
            if done[id(m)] is None:
                for name, child in list(m.named_children()):
                    new = visit(child, f"{path}.{name}" if path else name)
                    if new is not child:
                        setattr(m, name, new)
        return done[id(m)] or m

    return visit(root, "")


def carry(src: nn.Module, dst: nn.Module, kw: dict, entry: ConversionEntry) -> None:
    """Carry ``src``'s state into ``dst`` (the module docstring), recorded in ``entry``."""
    with torch.no_grad():
        for name, identity in (("weight", 1.0), ("bias", 0.0)):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if isinstance(s, Tensor) and isinstance(d, Tensor) and d.shape == s.shape:
                d.copy_(s)
                d.requires_grad_(s.requires_grad)
                entry.carried.append(name)
            elif isinstance(s, Tensor) and isinstance(d, Tensor):
                entry.dropped.append(
                    f"{name}: shape {tuple(s.shape)} does not fit {tuple(d.shape)}"
                )
            elif isinstance(s, Tensor) and not bool(torch.all(s == identity)):
                entry.dropped.append(f"{name}: the target has no {name}")
        s_mean, d_mean = getattr(src, "running_mean", None), getattr(dst, "running_mean", None)
        if isinstance(s_mean, Tensor):
            if isinstance(d_mean, Tensor) and d_mean.shape == s_mean.shape:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    s, d = getattr(src, name, None), getattr(dst, name, None)
                    if isinstance(s, Tensor) and isinstance(d, Tensor):
                        d.copy_(s)
                        entry.carried.append(name)
            elif not _is_fresh(src):
                entry.dropped.append(
                    "running_mean, running_var: the target tracks no running statistics "
                    "of that shape"
                )
        for name in ("eps", "momentum"):
            value = getattr(src, name, None)
            if name not in kw and hasattr(dst, name) and hasattr(src, name):
                if value is None and name == "eps" and dst.eps is not None:
                    continue  # RMSNorm's eps=None (machine eps) has no float equivalent
                setattr(dst, name, value)
                entry.carried.append(name)
    # Whatever else the source holds (a subclass's extra parameters, buffers or
    # child modules, e.g. a fused activation) has no place in the target.
    for kind, named in (("parameter", src.named_parameters), ("buffer", src.named_buffers)):
        entry.dropped += [f"{kind} {n}" for n, _ in named(recurse=False) if n not in _CONSUMED]
    for name, child in src.named_children():
        entry.dropped.append(f"child module {name} ({type(child).__name__})")


def _is_fresh(m: nn.Module) -> bool:
    """Running statistics never updated (they carry no information)."""
    count = getattr(m, "num_batches_tracked", None)
    if isinstance(count, Tensor):
        return int(count) == 0
    return bool(torch.all(m.running_mean == 0) and torch.all(m.running_var == 1))


def place_like(src: nn.Module, dst: nn.Module) -> nn.Module:
    ref = next((t for t in (*src.parameters(), *src.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        dst = dst.to(device=ref.device, dtype=ref.dtype)
    return dst.train(src.training)
