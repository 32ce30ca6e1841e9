"""Name registry of normalization layers: ``create_norm(name, num_features, **kw)``.

The channel count is always the first argument (as in timm). ``dims`` says what the
layer will see: 1 for (N, C) or (N, C, L) inputs, 2 for (N, C, H, W), 3 for
(N, C, D, H, W); per-sample norms (layer, group, rms) use it to pick the axes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

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
    return factory(num_features, dims=dims, **kw)


_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


@register_norm("batch")
def _batch(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return _BATCH[dims](num_features, **kw)


@register_norm("instance")
def _instance(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return _INSTANCE[dims](num_features, **kw)


@register_norm("layer")
def _layer(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    # Over the channels of each sample (and, for images, through GroupNorm(1, C):
    # LayerNorm over (C, *spatial) with a per-channel affine).
    if dims == 1:
        return nn.LayerNorm(num_features, **kw)
    return nn.GroupNorm(1, num_features, **kw)


@register_norm("group")
def _group(num_features: int, *, dims: int, num_groups: int = 32, **kw: object) -> nn.Module:
    return nn.GroupNorm(min(num_groups, num_features), num_features, **kw)


@register_norm("rms")
def _rms(num_features: int, *, dims: int, **kw: object) -> nn.Module:
    return nn.RMSNorm(num_features, **kw)
