"""Argument checks of the normalization family: one function and one message per rule,
with torch's exception type and wording where torch has one: constructor arguments
(which torch does not check), then shapes (first call per shapes) and values (each call).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from torch import Tensor

# --- Constructor arguments


def eps_arg(eps: float) -> float:
    """A layer's ``eps``: a finite real > 0, returned as a float."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite float (such as 1e-5), got {eps!r}")
    if eps <= 0:
        raise ValueError(
            f"eps must be > 0 (it keeps 1/sqrt(var + eps) finite when a channel is "
            f"constant), got {eps!r}; use a small positive value such as 1e-5"
        )
    return float(eps)


def momentum_arg(momentum: float | None) -> float | None:
    """A layer's ``momentum``: a real in [0, 1], or None (cumulative average)."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise ValueError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (running = (1 - momentum) * running + momentum * "
            f"batch), or None for a cumulative average; got {momentum!r}"
        )
    return float(momentum)


def norm_args(
    num_features: int, eps: float, momentum: float | None
) -> tuple[int, float, float | None]:
    """A BatchNorm's or InstanceNorm's ``num_features``, ``eps`` and ``momentum``."""
    return positive_int(num_features, "num_features"), eps_arg(eps), momentum_arg(momentum)


def positive_int(value: int, name: str, meaning: str = "") -> int:
    """An int >= 1 (not a bool), returned as an int; ``meaning`` goes into the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be a positive int{what}, got {value!r}")
    return int(value)


def normalized_shape(value: int | Sequence[int]) -> tuple[int, ...]:
    """LayerNorm's, RMSNorm's and DyT's ``normalized_shape``: a positive int or a
    non-empty sequence of them, returned as a tuple of ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        shape: tuple = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        shape = tuple(value)
    else:
        shape = ()
    if not shape or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in shape
    ):
        raise ValueError(
            "normalized_shape must be a positive int or a non-empty sequence of them (the "
            f"trailing shape normalized, where the affine applies), got {value!r}"
        )
    return tuple(int(n) for n in shape)


# --- Call-time values


def eps(value: float) -> None:
    """``eps`` of a call of the core: a finite number > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(
            "eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite), "
            f"got {value!r}"
        )


def values_per_channel(
    size: Sequence[int], count: int, *, empty_ok: bool = True, where: str = ""
) -> None:
    """Training statistics need more than ``count`` = 1 value per channel (torch's
    message); an empty batch passes when ``empty_ok`` (torch's BatchNorm returns one)."""
    if count == 1 or (count == 0 and not empty_ok):
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}{where}"
        )


def values_per_virtual_batch(
    size: tuple[int, ...], virtual_batch_size: int, chunk: int, rest: int, count: int
) -> None:
    """Ghost BN: every virtual batch (chunks of ``chunk`` samples, a last one of
    ``rest``) needs more than one value per channel; ``count`` is the smallest's."""
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel in every virtual batch when "
            f"training, got input size {size} with virtual_batch_size="
            f"{virtual_batch_size} (chunks of {chunk} and a last one of {rest} sample(s)); "
            f"use a batch size that is a multiple of virtual_batch_size, or drop the last batch"
        )


def spatial_size(size: Sequence[int]) -> None:
    """InstanceNorm's statistics need more than one spatial element (torch's message)."""
    if math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {size}"
        )


# --- Call-time shapes: the functional wrappers


def per_channel(x: Tensor, **tensors: Tensor | None) -> None:
    """Each given tensor holds one value per channel (dim 1) of ``x``; torch's message."""
    channels = x.shape[1]
    for name, t in tensors.items():
        if t is not None and t.numel() != channels:
            raise RuntimeError(
                f"{name} should contain {channels} elements not {t.numel()} "
                f"(one per channel of the input, whose shape is {tuple(x.shape)})"
            )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> None:
    """:func:`~covshift.nn.functional.batch_norm`'s shapes (eps: :func:`batch_norm_eps`)."""
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got {x.dim()}D input")
    if training:
        values_per_channel(x.shape, x.shape[0] * math.prod(x.shape[2:]))
    per_channel(x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)


def batch_norm_eps(eps: float, training: bool) -> None:
    """BatchNorm's eps (torch's messages)."""
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    """:func:`~covshift.nn.functional.group_norm`'s arguments (torch's messages)."""
    if x.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {x.dim()}"
        )
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups != 0:
        raise RuntimeError(
            f"Expected number of channels in input ({channels}) to be divisible by "
            f"num_groups ({num_groups}), but got input of shape {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels "
                f"in input, but got {name} of shape {list(t.shape)} and input of shape "
                f"{list(x.shape)}"
            )
    # torch's check, on the view torch takes: one value per (sample, group) is not enough.
    size = [x.shape[0] * channels // num_groups, num_groups, *x.shape[2:]]
    values_per_channel(size, size[0] * math.prod(size[2:]))


def trailing_shape(
    x: Tensor, normalized_shape: int | Sequence[int], rms: bool = False
) -> tuple[int, ...]:
    """LayerNorm's/RMSNorm's ``normalized_shape`` is the trailing shape of ``x``."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k :]) != shape:
        star = "*" if rms else "*, "
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[{star}{', '.join(map(str, shape))}], but got input of size{list(x.shape)}"
        )
    return shape


# --- Call-time shapes: the general core (resolve_layout)


def dims(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Dims of a ``ndim``-D input, at least one, none twice; returned sorted, >= 0."""
    seq = (value,) if isinstance(value, int) else tuple(value)
    if not seq:
        raise ValueError(f"{name} must name at least one dim, got {value!r}")
    out = []
    for d in seq:
        if not isinstance(d, int) or not -ndim <= d < ndim:
            raise ValueError(
                f"{name} must be ints in [-{ndim}, {ndim - 1}] for a {ndim}D input, got {value!r}"
            )
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a dim twice: {value!r}")
    return tuple(sorted(out))
