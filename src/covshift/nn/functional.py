"""The functional interface of the normalization family, with torch.nn.functional's names.

Every function is one call of the same core (as flax does it)::

    x̂ = (x - μ) · rstd,   rstd = 1 / sqrt(σ² + eps),   y = x̂ · w + b

over the axes each layer states (:mod:`.layout`); the math, forward and closed-form
backward, is in :mod:`.reference` (the one place to read it, with the equation numbers
of docs/derivations.md). A call goes: checks on the first call per argument shapes
(:mod:`.checks`), a remembered layout, then :func:`.backend.normalize`, which picks the
path that runs (the native node, or the reference Function).

Numeric choices, the same for every layer: statistics in float32 at least (float16 /
bfloat16 inputs upcast, float64 stays); the biased variance by two passes; eps inside
the square root. Public: :func:`normalize`, :func:`normalize_with_stats`,
:func:`moments`, :func:`batch_norm`, :func:`layer_norm`, :func:`group_norm`,
:func:`instance_norm`, :func:`rms_norm`, and the pieces they are made of,
:func:`resolve_layout`, :func:`normalize_fwd`, :func:`normalize_bwd`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """Normalize ``x`` over ``reduce_dims``, then apply an optional affine map.

    ``y = (x - μ) / sqrt(σ² + eps) · w + b`` with μ, σ² (biased) over ``reduce_dims``;
    with ``subtract_mean=False``, ``y = x / sqrt(mean(x²) + eps) · w + b``.

    Differentiable, with a hand-derived backward (:func:`.reference.backward`) that
    is itself differentiable, so double backward works.

    Args:
        x: input of any shape and floating dtype.
        reduce_dims: the dims the statistics are taken over (negative ones allowed).
        weight, bias: the affine map, or None. With ``channel_dim`` an int they have
            shape ``(C,)`` with ``C = x.shape[channel_dim]``; with ``channel_dim=None``
            they broadcast against the trailing dims of ``x`` (shape ``x.shape[-k:]``).
        eps: added to the variance; must be > 0.
        subtract_mean: False gives RMS normalization.
        groups: split the channel dim into this many groups of ``C // groups``
            channels; each group is normalized on its own over ``reduce_dims``, which
            must then include ``channel_dim`` (GroupNorm). ``channel_dim`` in
            ``reduce_dims`` without ``groups`` means one group.
        channel_dim: the dim the per-channel affine runs along, or None for a
            trailing-shape affine.

    Returns:
        A tensor of ``x``'s shape and dtype.

    Example:
        >>> x = torch.randn(8, 4, 5, 5)
        >>> y = normalize(x, (0, 2, 3), eps=1e-5)  # BatchNorm2d in training
        >>> y = normalize(x, (1, 2, 3), eps=1e-5, groups=2)  # GroupNorm(2, 4)
    """
    layout = _checked_layout(x, reduce_dims, weight, bias, eps, groups, channel_dim)
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
    """:func:`normalize`, also returning the statistics it used.

    Returns:
        ``(y, mean, var)``: ``mean`` and the biased ``var`` are in the compute dtype
        (float32 at least), detached (no gradient flows through them), with the
        reduced dims removed; for grouped inputs the channel dim becomes the group
        dim (GroupNorm on (N, C, H, W) gives (N, G)). ``mean`` is None when
        ``subtract_mean`` is False (``var`` is then the mean of squares).
    """
    layout = _checked_layout(x, reduce_dims, weight, bias, eps, groups, channel_dim)
    return backend.normalize(x, weight, bias, layout, float(eps), subtract_mean, stats=True)


def _checked_layout(
    x: Tensor,
    reduce_dims: Dims,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    groups: int | None,
    channel_dim: int | None,
) -> NormLayout:
    checks.eps(eps)
    return resolve_layout(
        x.shape,
        reduce_dims,
        groups=groups,
        channel_dim=channel_dim,
        weight_shape=None if weight is None else weight.shape,
        bias_shape=None if bias is None else bias.shape,
    )


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
    """Batch Normalization (Ioffe & Szegedy 2015, arXiv 1502.03167), torch semantics.

    Channels are dim 1; statistics over every other dim. In training the batch's
    biased variance normalizes, and the running statistics (when given) are updated
    in place by :mod:`covshift.nn.running`'s rule (derivations §7)::

        running_mean = (1 - m) · running_mean + m · μ_B
        running_var  = (1 - m) · running_var  + m · σ²_B · M / (M - 1)   (unbiased)

    When ``num_batches_tracked`` is given (a long scalar tensor) it is incremented
    first, and ``momentum=None`` then means a cumulative average, ``m = 1 / count``.
    Out of training, ``running_mean``/``running_var`` normalize (an affine map, §8).

    Args:
        x: ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers or None (then training must
            be True: the batch statistics are used and nothing is tracked).
        weight, bias: ``(C,)`` or None.
        training: use batch statistics (and update the running ones).
        momentum: the update factor m, or None for the cumulative average.
        eps: added to the variance; > 0 in training, >= 0 otherwise (as torch).
        num_batches_tracked: the step counter buffer, or None.

    Raises:
        ValueError: one value per channel in training, bad eps, momentum=None
            without a counter, running stats missing out of training.
        RuntimeError: a parameter or buffer whose length is not C.
    """
    if not training:
        checks.batch_norm(x, running_mean, running_var, weight, bias, training, eps)
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm with training=False needs running_mean and running_var; "
                "pass training=True to normalize with the batch statistics"
            )
        return affine_with_stats(x, running_mean, running_var, weight, bias, eps, channel_dim=1)

    layout = L.batch_norm_layout(x, running_mean, running_var, weight, bias, eps)
    checks.batch_norm_eps(eps)  # (checked with the shapes on their first call; may differ since)
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
    """Layer Normalization (Ba, Kiros & Hinton 2016, arXiv 1607.06450) over the last dims.

    Statistics over the trailing ``normalized_shape``; ``weight``/``bias`` have that
    shape (element-wise affine, derivations §6). Same arguments as
    ``torch.nn.functional.layer_norm``.
    """
    layout = L.trailing_norm_layout(x, normalized_shape, weight, bias, eps, rms=False)
    checks.eps(eps)
    return backend.normalize(x, weight, bias, layout, float(eps), True)


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS normalization (Zhang & Sennrich 2019, arXiv 1910.07467) over the last dims.

    ``y = x / sqrt(mean(x²) + eps) · w`` (derivations §4); ``eps=None`` means the
    machine epsilon of the compute dtype (float32 for half inputs), as
    ``torch.nn.functional.rms_norm``.
    """
    if eps is None:
        eps = torch.finfo(compute_dtype(x.dtype)).eps
    layout = L.trailing_norm_layout(x, normalized_shape, weight, None, eps, rms=True)
    checks.eps(eps)
    return backend.normalize(x, weight, None, layout, float(eps), False)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group Normalization (Wu & He 2018, arXiv 1803.08494).

    The C channels of ``x`` (N, C, *) fall into ``num_groups`` groups; each sample's
    group is normalized over its channels and spatial dims; per-channel affine.
    The math: :func:`.reference.forward` / :func:`.reference.backward` over
    :func:`.layout.group_norm_layout` (derivations §5).
    """
    layout = L.group_norm_layout(x, num_groups, weight, bias, eps)
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
    """Instance Normalization (Ulyanov, Vedaldi & Lempitsky 2016, arXiv 1607.08022).

    Each (sample, channel) is normalized over its spatial dims. With
    ``use_input_stats`` and running buffers given, they are updated with the batch
    average of the per-instance statistics (unbiased variance), as torch does;
    without ``use_input_stats`` the running statistics normalize.
    """
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
        return affine_with_stats(x, running_mean, running_var, weight, bias, eps, channel_dim=1)
    checks.spatial_size(x.shape)
    dims = tuple(range(2, x.dim()))
    y, mean, var = normalize_with_stats(x, dims, weight, bias, eps=eps, channel_dim=1)
    if running_mean is not None or running_var is not None:
        # mean, var: (N, C) per instance; the buffers track their batch average.
        assert mean is not None
        bessel = running_stats.bessel(L.count(x.shape, dims))
        running_stats.update(running_mean, running_var, mean.mean(0), var.mean(0), momentum, bessel)
    return y
