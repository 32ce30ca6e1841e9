"""Name registry of normalization layers: ``create_norm(name, num_features, **kw)``.

The channel count is always the first argument (as in timm). ``dims`` says what the
layer will see: 1 for (N, C) or (N, C, L) inputs, 2 for (N, C, H, W), 3 for
(N, C, D, H, W); per-sample norms (layer, group, rms) use it to pick the axes.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

from torch import nn

from covshift.nn import kinds
from covshift.nn.noise import NoisyNorm

NormFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, NormFactory] = {}


def register_norm(name: str) -> Callable[[NormFactory], NormFactory]:
    """Decorator that registers ``factory(num_features, *, dims, **kw)`` under ``name``."""

    def decorate(factory: NormFactory) -> NormFactory:
        if name in _REGISTRY:
            raise ValueError(f"normalization {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def norm_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def create_norm(name: str, num_features: int, *, dims: int = 1, **kw: object) -> nn.Module:
    """Build the normalization layer registered as ``name`` for ``num_features`` channels.

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad ``dims``.
    """
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3 (spatial rank of the input), got {dims!r}")
    try:
        factory = _REGISTRY[name]
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


_SHAPE_ARGUMENTS = {"self", "num_features", "normalized_shape", "num_channels", "dims"}


def _keywords(factory: NormFactory, num_features: int, dims: int) -> list[str]:
    """The keyword arguments ``name``'s layer accepts: its factory's own and its
    class's constructor's (less the shape arguments the factory fills in)."""
    own = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in _SHAPE_ARGUMENTS
    ]
    try:
        built = type(factory(num_features, dims=dims))
    except Exception:  # e.g. a required keyword: the factory's own list is all there is
        return own
    params = inspect.signature(built).parameters
    return own + [
        n
        for n, p in params.items()
        if n not in _SHAPE_ARGUMENTS | {"device", "dtype", "num_groups", *own}
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _class(kind: str, dims: int) -> type[nn.Module]:
    """The covshift class of ``kind`` for inputs of spatial rank ``dims``."""
    classes = kinds.get(kind).classes
    return classes[dims] if dims in classes else classes[None]


@register_norm("batch")
def _batch(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return _class("batch", dims)(num_features, **kw)


@register_norm("instance")
def _instance(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return _class("instance", dims)(num_features, **kw)


@register_norm("layer")
def _layer(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    # Over the channels of each sample (and, for images, through GroupNorm(1, C):
    # LayerNorm over (C, *spatial) with a per-channel affine).
    if dims == 1:
        return _class("layer", dims)(num_features, **kw)  # type: ignore[arg-type]
    return _class("group", dims)(1, num_features, **kw)  # type: ignore[arg-type]


def default_num_groups(num_channels: int, *, dims: int, preferred: int = 32) -> int:
    """The group count used when none is given: the largest divisor of
    ``num_channels`` that is at most ``preferred`` (Wu & He 2018 use G = 32).

    Without spatial positions (``dims=1``, an MLP's features) each group must hold at
    least two channels, or every value would be normalized to 0.
    """
    min_size = 2 if dims == 1 else 1
    for groups in range(min(preferred, num_channels), 0, -1):
        if num_channels % groups == 0 and num_channels // groups >= min_size:
            return groups
    raise ValueError(
        f"GroupNorm over {num_channels} feature(s) without spatial positions needs at least "
        "2 channels per group; use more features or another normalization"
    )


@register_norm("group")
def _group(
    num_features: int, *, dims: int, num_groups: int | None = None, **kw: object
) -> nn.Module:
    # An explicit num_groups is used as given (GroupNorm checks that it divides C).
    groups = default_num_groups(num_features, dims=dims) if num_groups is None else num_groups
    return _class("group", dims)(groups, num_features, **kw)  # type: ignore[arg-type]


@register_norm("rms")
def _rms(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return _class("rms", dims)(num_features, **kw)  # type: ignore[arg-type]


# Variants (covshift.nn.renorm, ghost, noise, sync): their classes from the registry
# of kinds, where each registers itself.


@register_norm("batch_renorm")
def _batch_renorm(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return _class("batch_renorm", dims)(num_features, **kw)


@register_norm("ghost_batch")
def _ghost_batch(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return _class("ghost_batch", dims)(num_features, **kw)


@register_norm("batch_noisy")
def _batch_noisy(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    # Santurkar et al.'s "noisy BN": BatchNorm then non-stationary noise. The noise's
    # own arguments (generator, mean_range, ...) go to NormNoise, the rest to BN.
    noise_keys = ("generator", "mean_range", "scale_range", "mean_spread", "scale_std")
    noise_kw = {k: kw.pop(k) for k in noise_keys if k in kw}
    return NoisyNorm(_class("batch", dims)(num_features, **kw), **noise_kw)  # type: ignore[arg-type]


@register_norm("sync_batch")
def _sync_batch(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    layer = _class("sync_batch", dims)(num_features, **kw)
    layer.original_class = _class("batch", dims)  # what revert_sync_batchnorm restores
    return layer
