"""The registry of normalization kinds: what a layer is (:func:`norm_kind`, :func:`match`),
and how to build one by name (:func:`create_norm`, the channel count first, as in timm).
The base kinds are registered here, each variant where it is defined.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from covshift.nn import layers
from covshift.nn.noise import NoisyNorm

__all__ = [
    "Match",
    "NormKind",
    "batch_kinds",
    "create_norm",
    "default_num_groups",
    "get_kind",
    "match",
    "norm_kind",
    "norm_names",
    "own_behaviour",
    "register_kind",
    "register_norm",
    "torch_classes",
]

NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormKind:
    """A kind: its name (also a :func:`create_norm` name), covshift's and torch.nn's
    classes by spatial rank (None: any), whether its statistics run over the trailing
    dims rather than dim 1, and whether it is a BatchNorm kind (it folds)."""

    name: str
    classes: Mapping[int | None, type[nn.Module]]
    torch_classes: Mapping[int | None, type[nn.Module]] = field(default_factory=dict)
    trailing: bool = False
    batch_statistics: bool = False

    def cls(self, dims: int) -> type[nn.Module]:
        """The covshift class of this kind for inputs of spatial rank ``dims``."""
        return self.classes[dims] if dims in self.classes else self.classes[None]


class Match(NamedTuple):
    """The registered class a module's class is or subclasses, its kind and rank."""

    cls: type[nn.Module]
    kind: str
    dims: int | None


_KINDS: dict[str, NormKind] = {}
_FACTORIES: dict[str, NormFactory] = {}


def register_norm(name: str) -> Callable[[NormFactory], NormFactory]:
    """Decorator that registers ``factory(num_features, *, dims, **kw)`` under ``name``."""

    def decorate(factory: NormFactory) -> NormFactory:
        if name in _FACTORIES:
            raise ValueError(f"normalization {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorate


def register_kind(kind: NormKind, factory: NormFactory | None = None) -> NormKind:
    """Add ``kind`` to the table, and its name to :func:`create_norm`'s, built by
    ``factory`` or by default as ``kind.cls(dims)(num_features, **kw)``."""
    if kind.name in _KINDS:
        raise ValueError(f"norm kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind

    def build(num_features: int, *, dims: int, **kw: object) -> nn.Module:
        return kind.cls(dims)(num_features, **kw)

    register_norm(kind.name)(factory or build)
    return kind


def get_kind(name: str) -> NormKind:
    """The kind registered as ``name``."""
    return _KINDS[name]


def match(cls: type) -> Match | None:
    """The most specific registered class that ``cls`` is or subclasses (covshift's
    BatchNorm2d before torch's, which it subclasses), with its kind and rank; None for
    a class of no kind."""
    found = [
        Match(known, kind.name, dims)
        for kind in _KINDS.values()
        for table in (kind.classes, kind.torch_classes)
        for dims, known in table.items()
        if issubclass(cls, known)
    ]
    return max(found, key=lambda m: len(m.cls.__mro__), default=None)


def norm_kind(module: nn.Module) -> str | None:
    """The kind of normalization ``module`` is (``"batch"``, ``"layer"``, ...; docs/nn.md),
    for covshift's, torch.nn's and their subclasses; None if it is not one."""
    found = match(type(module))
    return None if found is None else found.kind


def own_behaviour(module: nn.Module) -> str | None:
    """What ``module`` does beyond its registered class (its own ``forward``, as timm's
    BatchNormAct2d, or child modules), which replacing it would lose; None: nothing."""
    found = match(type(module))
    if found is None:
        return None
    if type(module).forward is not found.cls.forward:
        return f"{type(module).__name__} overrides {found.cls.__name__}'s forward"
    children = ", ".join(f"{name} ({type(c).__name__})" for name, c in module.named_children())
    return f"{type(module).__name__} has child modules: {children}" if children else None


def batch_kinds() -> frozenset[str]:
    """The names of the BatchNorm kinds (batch statistics, running statistics)."""
    return frozenset(k.name for k in _KINDS.values() if k.batch_statistics)


def torch_classes() -> tuple[type[nn.Module], ...]:
    """torch.nn's classes of every kind."""
    return tuple(cls for k in _KINDS.values() for cls in k.torch_classes.values())


def norm_names() -> list[str]:
    """The names :func:`create_norm` knows, sorted."""
    return sorted(_FACTORIES)


def create_norm(name: str, num_features: int, *, dims: int = 1, **kw: object) -> nn.Module:
    """Build the normalization layer registered as ``name`` for ``num_features`` channels
    and inputs of spatial rank ``dims`` (1: (N, C) or (N, C, L); 2: (N, C, H, W); 3);
    ValueError for an unknown name (the message lists the known ones) or bad ``dims``."""
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3 (spatial rank of the input), got {dims!r}")
    try:
        factory = _FACTORIES[name]
    except KeyError:
        known = ", ".join(norm_names())
        raise ValueError(f"unknown normalization {name!r}; known: {known}") from None
    try:
        return factory(num_features, dims=dims, **kw)
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown is None:
            raise
        accepted = ", ".join(_keywords(factory, num_features, dims)) or "none"
        raise ValueError(
            f"normalization {name!r} takes no keyword {unknown[1]!r}; it takes: {accepted}"
        ) from None


def _keywords(factory: NormFactory, num_features: int, dims: int) -> list[str]:
    """The keywords a factory's layer accepts, less the shapes the factory fills in."""
    factory_params = inspect.signature(factory).parameters.values()
    own = [p.name for p in factory_params if p.kind is p.KEYWORD_ONLY and p.name != "dims"]
    try:
        params = inspect.signature(type(factory(num_features, dims=dims))).parameters
    except Exception:  # e.g. a required keyword: the factory's own list is all there is
        return own
    shape = {"num_features", "normalized_shape", "num_channels", "num_groups", "device", "dtype"}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return own + [n for n, p in params.items() if n not in {*shape, *own} and p.kind in kinds]


def default_num_groups(num_channels: int, *, dims: int, preferred: int = 32) -> int:
    """The group count used when none is given: the largest divisor of ``num_channels``
    at most ``preferred`` (Wu & He 2018 use 32); without spatial positions (``dims=1``)
    each group holds two channels at least, or every value would be normalized to 0."""
    min_size = 2 if dims == 1 else 1
    for groups in range(min(preferred, num_channels), 0, -1):
        if num_channels % groups == 0 and num_channels // groups >= min_size:
            return groups
    raise ValueError(
        f"GroupNorm over {num_channels} feature(s) without spatial positions needs at least "
        "2 channels per group; use more features or another normalization"
    )


def _layer(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    # Over the channels of each sample (and, for images, through GroupNorm(1, C):
    # LayerNorm over (C, *spatial) with a per-channel affine).
    if dims == 1:
        return layers.LayerNorm(num_features, **kw)  # type: ignore[arg-type]
    return layers.GroupNorm(1, num_features, **kw)  # type: ignore[arg-type]


def _group(
    num_features: int, *, dims: int, num_groups: int | None = None, **kw: object
) -> nn.Module:
    # An explicit num_groups is used as given (GroupNorm checks that it divides C).
    groups = default_num_groups(num_features, dims=dims) if num_groups is None else num_groups
    return layers.GroupNorm(groups, num_features, **kw)  # type: ignore[arg-type]


@register_norm("batch_noisy")
def _batch_noisy(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    # Santurkar et al.'s "noisy BN": BatchNorm then non-stationary noise. The noise's
    # own arguments (generator, mean_range, ...) go to TimeVaryingNoise, the rest to BN.
    noise_keys = ("generator", "mean_range", "scale_range", "mean_spread", "scale_std")
    noise_kw = {k: kw.pop(k) for k in noise_keys if k in kw}
    norm = get_kind("batch").cls(dims)(num_features, **kw)
    return NoisyNorm(norm, **noise_kw)


register_kind(
    NormKind(
        "batch",
        {1: layers.BatchNorm1d, 2: layers.BatchNorm2d, 3: layers.BatchNorm3d},
        {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
        batch_statistics=True,
    )
)
register_kind(
    NormKind(
        "instance",
        {1: layers.InstanceNorm1d, 2: layers.InstanceNorm2d, 3: layers.InstanceNorm3d},
        {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    )
)
register_kind(
    NormKind("layer", {None: layers.LayerNorm}, {None: nn.LayerNorm}, trailing=True), _layer
)
register_kind(NormKind("group", {None: layers.GroupNorm}, {None: nn.GroupNorm}), _group)
register_kind(NormKind("rms", {None: layers.RMSNorm}, {None: nn.RMSNorm}, trailing=True))
