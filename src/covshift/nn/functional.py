"""The functional interface of the normalization family, with torch.nn.functional's names.

Every function is one call of one core, ``x̂ = (x - μ) · rstd, rstd = 1 / sqrt(σ² +
eps), y = x̂ · w + b``, over the axes each layer states (:mod:`.layout`; the math:
:mod:`.reference`): checks on the first call per argument shapes, a remembered layout,
then :func:`.backend.normalize`, which picks the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from covshift.nn import backend, checks, reference
from covshift.nn import layout as L
from covshift.nn import running as running_stats
from covshift.nn.layout import NormLayout, resolve_layout
from covshift.nn.reference import affine_with_stats, compute_dtype, moments
from covshift.nn.running import RunningStats

__all__ = [
    "NormLayout",
    "batch_norm",
    "compute_dtype",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "normalize_bwd",
    "normalize_fwd",
    "normalize_with_stats",
    "resolve_layout",
    "rms_norm",
]

Dims = int | Sequence[int]

#: ``(y, mean, rstd, var)`` over a layout: the reference forward, differentiable.
normalize_fwd = reference.forward
#: The closed-form ``(dx, dweight, dbias)``: the reference backward, differentiable.
normalize_bwd = reference.backward


def normalize(
    x: Tensor,
    reduce_dims: Dims,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float,
    subtract_mean: bool = True,
    groups: int | None = None,
    channel_dim: int | None = 1,
) -> Tensor:
    """``y = (x - μ) / sqrt(σ² + eps) · w + b``, μ and σ² (biased) over ``reduce_dims``
    (``x / sqrt(mean(x²) + eps) · w + b`` with ``subtract_mean=False``), of ``x``'s shape
    and dtype; differentiable twice (the backward is :func:`.reference.backward`).

    Args:
        reduce_dims: the dims the statistics are taken over (negative ones allowed).
        weight, bias: the affine map, or None: ``(C,)`` along ``channel_dim``, or with
            ``channel_dim=None`` the trailing shape of ``x``.
        groups: split the channel dim into groups of ``C // groups`` channels, each
            normalized on its own over ``reduce_dims``, which must then include
            ``channel_dim`` (GroupNorm; ``channel_dim`` reduced without groups: one).

    Example: ``normalize(x, (0, 2, 3), eps=1e-5)`` is BatchNorm2d in training,
    ``normalize(x, (1, 2, 3), eps=1e-5, groups=2)`` GroupNorm(2, C).
    """
    layout = _layout(x, reduce_dims, weight, bias, eps, groups=groups, channel_dim=channel_dim)
    return backend.normalize(x, weight, bias, layout, float(eps), subtract_mean)


def normalize_with_stats(
    x: Tensor,
    reduce_dims: Dims,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float,
    subtract_mean: bool = True,
    groups: int | None = None,
    channel_dim: int | None = 1,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`normalize`, and the statistics it used: ``(y, mean, var)``, ``mean`` and
    the biased ``var`` detached, in the compute dtype, the reduced dims removed (the
    group dim for grouped inputs: GroupNorm on (N, C, H, W) gives (N, G)); ``mean`` None
    without ``subtract_mean`` (``var`` is then the mean of squares)."""
    layout = _layout(x, reduce_dims, weight, bias, eps, groups=groups, channel_dim=channel_dim)
    return backend.normalize(x, weight, bias, layout, float(eps), subtract_mean, stats=True)


def _layout(
    x: Tensor, dims: Dims, w: Tensor | None, b: Tensor | None, eps: float, **kw: Any
) -> NormLayout:
    checks.eps(eps)
    shapes = {"weight_shape": L.shape_of(w), "bias_shape": L.shape_of(b)}
    return resolve_layout(x.shape, dims, **kw, **shapes)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Batch Normalization (Ioffe & Szegedy 2015, arXiv 1502.03167) of ``x`` (N, C, *),
    torch.nn.functional's arguments, plus the step counter.

    In training the batch statistics normalize and the running buffers, when given,
    move by :mod:`covshift.nn.running`'s rule (§7): ``num_batches_tracked`` (a long
    scalar tensor) += 1 first, and ``momentum=None`` is then the cumulative average.
    Out of training the running statistics normalize (an affine map, §8).

    ValueError for one value per channel in training, a bad eps, momentum=None without
    a counter or no running stats out of training; RuntimeError for a length not C.
    """
    if not training:
        checks.batch_norm(x, running_mean, running_var, weight, bias, training=False)
        checks.batch_norm_eps(eps, training=False)
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm with training=False needs running_mean and running_var; "
                "pass training=True to normalize with the batch statistics"
            )
        return affine_with_stats(x, running_mean, running_var, weight, bias, eps)

    layout = L.batch_norm_layout(x, running_mean, running_var, weight, bias)
    checks.batch_norm_eps(eps, training=True)
    if running_mean is None and running_var is None:
        checks.eps(eps)
        return backend.normalize(x, weight, bias, layout, float(eps), True)
    if running_mean is None or (momentum is None and num_batches_tracked is None):
        # Nothing to count (no running mean), or a momentum=None without a counter
        # (which raises): resolve the factor here, the node then takes it as given.
        momentum = running_stats.step_factor(
            momentum, num_batches_tracked, running_mean is not None
        )
        num_batches_tracked = None
    m = None if momentum is None else float(momentum)
    # One native call where it applies: the step counter, the normalization, the updates.
    bessel = running_stats.bessel(layout.count)
    running = RunningStats(running_mean, running_var, num_batches_tracked, m, bessel)
    return backend.normalize(x, weight, bias, layout, float(eps), True, running=running)


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer Normalization (Ba, Kiros & Hinton 2016, arXiv 1607.06450) over the trailing
    ``normalized_shape``, an element-wise affine of that shape (§6); torch's arguments."""
    layout = L.trailing_norm_layout(x, normalized_shape, weight, bias, rms=False)
    checks.eps(eps)
    return backend.normalize(x, weight, bias, layout, float(eps), True)


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS normalization (Zhang & Sennrich 2019, arXiv 1910.07467) over the trailing dims,
    ``y = x / sqrt(mean(x²) + eps) · w`` (§4); ``eps=None``: the compute dtype's machine
    epsilon, as ``torch.nn.functional.rms_norm``."""
    if eps is None:
        eps = torch.finfo(compute_dtype(x.dtype)).eps
    layout = L.trailing_norm_layout(x, normalized_shape, weight, None, rms=True)
    checks.eps(eps)
    return backend.normalize(x, weight, None, layout, float(eps), False)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group Normalization (Wu & He 2018, arXiv 1803.08494): each sample's group of
    ``C / num_groups`` channels normalized over them and the spatial dims, a per-channel
    affine; the reference over :func:`.layout.group_norm_layout` (§5)."""
    layout = L.group_norm_layout(x, num_groups, weight, bias)
    checks.eps(eps)
    return backend.normalize(x, weight, bias, layout, float(eps), True)


def instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance Normalization (Ulyanov, Vedaldi & Lempitsky 2016, arXiv 1607.08022): each
    (sample, channel) over its spatial dims; running buffers track the batch mean of the
    per-instance statistics (torch's rule) and normalize without ``use_input_stats``."""
    if x.dim() < 3:
        raise ValueError(f"instance_norm expects an input of shape (N, C, *), got {x.dim()}D")
    checks.per_channel(
        x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(
                "instance_norm with use_input_stats=False needs running_mean and running_var"
            )
        return affine_with_stats(x, running_mean, running_var, weight, bias, eps)
    checks.spatial_size(x.shape)
    dims = tuple(range(2, x.dim()))
    y, mean, var = normalize_with_stats(x, dims, weight, bias, eps=eps, channel_dim=1)
    if running_mean is not None or running_var is not None:
        # mean, var: (N, C) per instance; the buffers track their batch average.
        assert mean is not None
        bessel = running_stats.bessel(L.count(x.shape, dims))
        running_stats.update(running_mean, running_var, mean.mean(0), var.mean(0), momentum, bessel)
    return y
