"""The registry of norm kinds: which classes are which kind of normalization.

One table that every consumer queries: :mod:`.convert` (what a layer is, what to build
in the other library), :mod:`.registry` (the class for a name and input rank),
:mod:`.fold` (the BatchNorm kinds), :mod:`.sync` (the plain BatchNorms to convert) and
``covshift.probe.select`` (torch.nn's norm classes).

A kind lists its covshift classes and torch.nn's by the input's spatial rank (``dims``
1, 2, 3; None for a class that serves every rank). The base kinds are registered
here; each variant registers itself where it is defined (:mod:`.renorm`,
:mod:`.ghost`, :mod:`.sync`), and ``covshift.nn`` imports them all, so the table is
complete before any query.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from covshift.nn import layers

__all__ = [
    "NormKind",
    "batch_kinds",
    "classify",
    "classify_class",
    "get",
    "kind_of",
    "register",
    "torch_classes",
]


@dataclass(frozen=True)
class NormKind:
    """One kind of normalization.

    Attributes:
        name: ``"batch"``, ``"group"``, ... (the :func:`covshift.nn.create_norm` name).
        classes: covshift's classes by ``dims`` (None: one class for every rank).
        torch_classes: torch.nn's classes of the same kind, likewise.
        trailing: the statistics run over the trailing dims (LayerNorm, RMSNorm), not
            over dim 1 (channels first).
        batch_statistics: a BatchNorm kind: batch statistics in training, running
            statistics in eval (so it folds into the layer before it).
    """

    name: str
    classes: Mapping[int | None, type[nn.Module]]
    torch_classes: Mapping[int | None, type[nn.Module]]
    trailing: bool = False
    batch_statistics: bool = False


_KINDS: dict[str, NormKind] = {}


def register(kind: NormKind) -> NormKind:
    """Add ``kind`` to the table (a variant registers itself where it is defined)."""
    if kind.name in _KINDS:
        raise ValueError(f"norm kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> NormKind:
    """The kind registered as ``name``."""
    return _KINDS[name]


def _entries() -> Iterator[tuple[type[nn.Module], str, int | None]]:
    for kind in _KINDS.values():
        for table in (kind.classes, kind.torch_classes):
            for dims, cls in table.items():
                yield cls, kind.name, dims


def classify_class(cls: type) -> tuple[type[nn.Module], str, int | None] | None:
    """``(known class, kind, dims)`` for the most specific known class that ``cls``
    is or subclasses (Batch Renorm before BatchNorm), or None."""
    found = [e for e in _entries() if issubclass(cls, e[0])]
    return max(found, key=lambda e: len(e[0].__mro__), default=None)


def classify(m: nn.Module) -> tuple[type[nn.Module], str, int | None] | None:
    """:func:`classify_class` of ``type(m)``."""
    return classify_class(type(m))


def kind_of(m: nn.Module) -> str | None:
    """The kind of normalization ``m`` is ("batch", "group", "layer", "instance", "rms",
    "sync_batch", "batch_renorm", "ghost_batch"), or None if it is not one."""
    found = classify(m)
    return None if found is None else found[1]


def batch_kinds() -> frozenset[str]:
    """The names of the BatchNorm kinds (batch statistics, running statistics)."""
    return frozenset(k.name for k in _KINDS.values() if k.batch_statistics)


def torch_classes() -> tuple[type[nn.Module], ...]:
    """torch.nn's classes of every kind."""
    return tuple(cls for k in _KINDS.values() for cls in k.torch_classes.values())


register(
    NormKind(
        "batch",
        {1: layers.BatchNorm1d, 2: layers.BatchNorm2d, 3: layers.BatchNorm3d},
        {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
        batch_statistics=True,
    )
)
register(
    NormKind(
        "instance",
        {1: layers.InstanceNorm1d, 2: layers.InstanceNorm2d, 3: layers.InstanceNorm3d},
        {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    )
)
register(NormKind("layer", {None: layers.LayerNorm}, {None: nn.LayerNorm}, trailing=True))
register(NormKind("group", {None: layers.GroupNorm}, {None: nn.GroupNorm}))
register(NormKind("rms", {None: layers.RMSNorm}, {None: nn.RMSNorm}, trailing=True))
