"""Normalization as pure math over reduction axes, with closed-form backward passes.

Every layer of the family is one call of the same core (as flax does it):

    x̂ = (x - μ) · rstd,   rstd = 1 / sqrt(σ² + eps),   y = x̂ · w + b

where μ and σ² (the biased variance) are taken over ``reduce_dims`` of ``x``,
optionally inside groups of channels (Wu & He 2018, arXiv 1803.08494), and with the
mean subtraction optionally switched off (RMS normalization: μ = 0, σ² = mean(x²);
Zhang & Sennrich 2019). The affine ``w, b`` broadcasts over one channel dim
(BatchNorm, GroupNorm, InstanceNorm) or over the trailing dims (LayerNorm, RMSNorm).

Numeric choices, the same for every layer:

- statistics are computed in float32 at least (float16/bfloat16 inputs are upcast,
  float64 stays float64); the output has the input's dtype;
- the variance is the biased one (divide by M, the count per statistic), taken by
  two passes (mean first, then the mean of squared deviations), which does not lose
  digits when |mean| >> std the way E[x²] - E[x]² does;
- eps is added to the variance inside the square root.

Public entry points (stable; the layers and the variants build on them) come first:
:func:`normalize`, :func:`normalize_with_stats`, :func:`moments`, :func:`batch_norm`,
:func:`layer_norm`, :func:`group_norm`, :func:`instance_norm`, :func:`rms_norm`.
The pure pieces they are made of follow: :func:`resolve_layout`,
:func:`normalize_fwd`, :func:`normalize_bwd`. ``docs/derivations.md`` derives the
backward pass that :func:`normalize_bwd` implements.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


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

    Differentiable, with a hand-derived backward (:func:`normalize_bwd`) that is
    itself differentiable, so double backward works.

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
    return _apply(x, weight, bias, layout, float(eps), subtract_mean)


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
    native = _native.normalize(x, weight, bias, layout, float(eps), subtract_mean)
    if native is not None:  # fused CPU kernels, autograd node in C++
        return native
    y, mean, var = _autograd.NormalizeFunction.apply(
        x, weight, bias, layout, float(eps), subtract_mean
    )
    squeeze = layout.stat_dims
    return y, None if mean is None else mean.squeeze(squeeze), var.squeeze(squeeze)


def _checked_layout(
    x: Tensor,
    reduce_dims: Dims,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    groups: int | None,
    channel_dim: int | None,
) -> NormLayout:
    _check_eps(eps)
    return resolve_layout(
        x.shape,
        reduce_dims,
        groups=groups,
        channel_dim=channel_dim,
        weight_shape=None if weight is None else weight.shape,
        bias_shape=None if bias is None else bias.shape,
    )


def _apply(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool,
) -> Tensor:
    """``y`` of :func:`normalize_with_stats` for a resolved (so checked) layout: the
    wrappers' hot path, which hands no statistics back to Python."""
    y = _native.normalize(x, weight, bias, layout, eps, subtract_mean, False)
    if y is not None:
        return y
    return _autograd.NormalizeFunction.apply(x, weight, bias, layout, eps, subtract_mean)[0]


def moments(
    x: Tensor, reduce_dims: Dims, *, keepdim: bool = False, subtract_mean: bool = True
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``reduce_dims``, in float32 at least.

    Two passes: ``μ = Σx / M`` then ``σ² = Σ(x - μ)² / M``. Differentiable (plain
    torch ops). With ``subtract_mean=False`` the second moment is ``mean(x²)`` and
    the returned mean is zeros.

    Example:
        >>> mean, var = moments(torch.randn(8, 3, 4, 4), (0, 2, 3))  # (3,), (3,)
    """
    dims = _normalize_dims(reduce_dims, x.dim(), "reduce_dims")
    xf = x.to(compute_dtype(x.dtype))
    count = _count(x.shape, dims)
    if subtract_mean:
        mean = xf.sum(dims, keepdim=True) / count
        xc = xf - mean
    else:
        mean = xf.new_zeros(())
        xc = xf
    var = (xc * xc).sum(dims, keepdim=True) / count
    if not subtract_mean:
        mean = mean.expand_as(var)
    if not keepdim:
        mean, var = mean.squeeze(dims), var.squeeze(dims)
    return mean, var


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
    in place::

        running_mean = (1 - m) · running_mean + m · μ_B
        running_var  = (1 - m) · running_var  + m · σ²_B · M / (M - 1)   (unbiased)

    When ``num_batches_tracked`` is given (a long scalar tensor) it is incremented
    first, and ``momentum=None`` then means a cumulative average, ``m = 1 / count``.
    Out of training, ``running_mean``/``running_var`` normalize (an affine map).

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
        _check_batch_norm(x, running_mean, running_var, weight, bias, training, eps)
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm with training=False needs running_mean and running_var; "
                "pass training=True to normalize with the batch statistics"
            )
        return _affine_with_stats(x, running_mean, running_var, weight, bias, eps, channel_dim=1)

    if torch.compiler.is_compiling():
        return _graph_batch_norm(
            x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked
        )
    layout = _batch_norm_layout(x, running_mean, running_var, weight, bias, eps)
    if not eps > 0:  # (checked with the shapes on their first call; eps may differ since)
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    tracking = running_mean is not None or running_var is not None
    if tracking:
        count = layout.count
        bessel = count / max(count - 1, 1)
        if running_mean is not None and (momentum is not None or num_batches_tracked is not None):
            # One native call: the step counter, the normalization, the buffer updates.
            m = None if momentum is None else float(momentum)
            running = (running_mean, running_var, num_batches_tracked, m, bessel)
            y = _native.normalize(x, weight, bias, layout, float(eps), True, False, running)
            if y is not None:
                return y
    factor = _update_factor(momentum, num_batches_tracked, running_mean is not None)
    if not tracking:
        _check_eps(eps)
        return _apply(x, weight, bias, layout, float(eps), True)
    running = (running_mean, running_var, None, factor, bessel)
    y = _native.normalize(x, weight, bias, layout, float(eps), True, False, running)
    if y is not None:
        return y
    reduce_dims = (0, *range(2, x.dim()))
    y, mean, var = normalize_with_stats(x, reduce_dims, weight, bias, eps=eps, channel_dim=1)
    _update_running(running_mean, running_var, mean, var, count, factor)
    return y


def _check_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got {x.dim()}D input")
    if training:
        _verify_batch_size(x.shape)
        if not eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    _check_per_channel(
        x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )


def _check_per_channel(x: Tensor, **tensors: Tensor | None) -> None:
    """Each given tensor holds one value per channel (dim 1) of ``x``; torch's message."""
    channels = x.shape[1]
    for name, t in tensors.items():
        if t is not None and t.numel() != channels:
            raise RuntimeError(
                f"{name} should contain {channels} elements not {t.numel()} "
                f"(one per channel of the input, whose shape is {tuple(x.shape)})"
            )


def _batch_norm_layout(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> NormLayout:
    """:func:`batch_norm`'s checks in training and its layout, remembered per shapes of
    the arguments: a repeated call skips the checks it passed before (see _remembered)."""
    wshape = None if weight is None else weight.shape
    bshape = None if bias is None else bias.shape
    key = (
        "batch_norm",
        x.shape,
        None if running_mean is None else running_mean.shape,
        None if running_var is None else running_var.shape,
        wshape,
        bshape,
    )
    layout = _remembered(key)
    if layout is None:
        _check_batch_norm(x, running_mean, running_var, weight, bias, True, eps)
        reduce_dims = (0, *range(2, x.dim()))
        layout = resolve_layout(
            x.shape, reduce_dims, channel_dim=1, weight_shape=wshape, bias_shape=bshape
        )
        _remember(key, layout)
    return layout


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer Normalization (Ba, Kiros & Hinton 2016, arXiv 1607.06450) over the last dims.

    Statistics over the trailing ``normalized_shape``; ``weight``/``bias`` have that
    shape (element-wise affine). Same arguments as ``torch.nn.functional.layer_norm``.
    """
    if torch.compiler.is_compiling():
        return _graph_trailing(x, normalized_shape, weight, bias, eps, True)
    layout = _trailing_layout(x, normalized_shape, weight, bias, eps, rms=False)
    _check_eps(eps)
    return _apply(x, weight, bias, layout, float(eps), True)


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS normalization (Zhang & Sennrich 2019, arXiv 1910.07467) over the last dims.

    ``y = x / sqrt(mean(x²) + eps) · w``; ``eps=None`` means the machine epsilon of
    the compute dtype (float32 for half inputs), as ``torch.nn.functional.rms_norm``.
    """
    if eps is None:
        eps = torch.finfo(compute_dtype(x.dtype)).eps
    if torch.compiler.is_compiling():
        return _graph_trailing(x, normalized_shape, weight, None, eps, False)
    layout = _trailing_layout(x, normalized_shape, weight, None, eps, rms=True)
    _check_eps(eps)
    return _apply(x, weight, None, layout, float(eps), False)


def _trailing_layout(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
) -> NormLayout:
    """The checks of :func:`layer_norm`/:func:`rms_norm` and their layout, remembered
    per argument shapes (see _remembered)."""
    wshape = None if weight is None else weight.shape
    bshape = None if bias is None else bias.shape
    ns = normalized_shape if isinstance(normalized_shape, (int, tuple)) else tuple(normalized_shape)
    key = ("rms_norm" if rms else "layer_norm", x.shape, ns, wshape, bshape)
    layout = _remembered(key)
    if layout is None:
        shape = _check_trailing(x, normalized_shape, rms=rms)
        _check_eps(eps)
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        layout = resolve_layout(
            x.shape, dims, channel_dim=None, weight_shape=wshape, bias_shape=bshape
        )
        _remember(key, layout)
    return layout


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
    """
    if torch.compiler.is_compiling():
        return _graph_group_norm(x, num_groups, weight, bias, eps)
    wshape = None if weight is None else weight.shape
    bshape = None if bias is None else bias.shape
    # (Remembered for int num_groups only: 2.0 hashes as 2, but resolve_layout rejects it.)
    key = ("group_norm", x.shape, num_groups, wshape, bshape)
    layout = _remembered(key) if type(num_groups) is int else None
    if layout is None:
        layout = _group_norm_layout(x, num_groups, weight, bias, eps)
        _remember(key, layout)
    _check_eps(eps)
    return _apply(x, weight, bias, layout, float(eps), True)


def _group_norm_layout(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> NormLayout:
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
    _verify_batch_size([x.shape[0] * channels // num_groups, num_groups, *x.shape[2:]])
    _check_eps(eps)
    return resolve_layout(
        x.shape,
        tuple(range(1, x.dim())),
        groups=num_groups,
        channel_dim=1,
        weight_shape=None if weight is None else weight.shape,
        bias_shape=None if bias is None else bias.shape,
    )


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
    _check_per_channel(
        x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(
                "instance_norm with use_input_stats=False needs running_mean and running_var"
            )
        return _affine_with_stats(x, running_mean, running_var, weight, bias, eps, channel_dim=1)
    _verify_spatial_size(x.shape)
    dims = tuple(range(2, x.dim()))
    if torch.compiler.is_compiling():
        y, mean, var = _graph_instance_norm(x, weight, bias, eps)
    else:
        y, mean, var = normalize_with_stats(x, dims, weight, bias, eps=eps, channel_dim=1)
    if running_mean is not None or running_var is not None:
        # mean, var: (N, C) per instance; the buffers track their batch average.
        assert mean is not None
        _update_running(
            running_mean, running_var, mean.mean(0), var.mean(0), _count(x.shape, dims), momentum
        )
    return y


# --------------------------------------------------------------------------------------
# Under torch.compile: one flat function per layer kind
# --------------------------------------------------------------------------------------
# Dynamo inlines every Python function a compiled call reaches and guards on each one
# (and on each global it read) on every later call; it also traces dead branches' tests
# (native kernels, remembered layouts) that cannot run while compiling. These functions
# build the layout straight from the shapes and call the plain-op autograd function;
# the eager checks run (to raise their errors) only where a cheap test fails, so a
# valid call inlines none of them. Same layouts, so the same numerics and saved tensors.


def _graph_trailing(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    subtract_mean: bool,
) -> Tensor:
    """:func:`layer_norm` (``subtract_mean``) or :func:`rms_norm` under torch.compile."""
    shape = tuple(x.shape)
    tail = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    lead = len(shape) - len(tail)
    fits = lead >= 0 and len(tail) > 0 and shape[lead:] == tail
    fits = fits and (weight is None or tuple(weight.shape) == tail)
    fits = fits and (bias is None or tuple(bias.shape) == tail)
    if not (fits and 0.0 < eps < 1e308):  # the eager checks raise the precise error
        layout = _trailing_layout(x, normalized_shape, weight, bias, eps, not subtract_mean)
        _check_eps(eps)
    else:
        dims = tuple(range(lead, len(shape)))
        count = 1
        for n in tail:
            count *= n
        plain = weight is None and bias is None
        layout = NormLayout(
            shape=shape,
            view_shape=shape,
            stat_dims=dims,
            partial_dims=dims,
            affine_shape=None if plain else (1,) * lead + tail,
            per_channel=plain or count == 1,  # (affine constant over the reduced dims)
            count=count,
            param_shape=None if plain else tail,
        )
    y, _, _ = _autograd.GraphNormalizeFunction.apply(
        x, weight, bias, layout, float(eps), subtract_mean
    )
    return y


def _channel_layout(x: Tensor, groups: int, affine: bool, first_stat_dim: int) -> NormLayout:
    """The layout of a per-channel norm of ``x`` (N, C, *) with C split into ``groups``
    (GroupNorm; no split for 0), statistics over the dims from ``first_stat_dim`` on
    (of ``x``) and over the batch for BatchNorm (``first_stat_dim`` 2, groups -1)."""
    shape = tuple(x.shape)
    nd, c = len(shape), shape[1]
    if groups > 0:  # GroupNorm: (N, G, C // G, *), reduced over all but N and G
        view = (shape[0], groups, c // groups, *shape[2:])
        dims = tuple(range(2, nd + 1))
        partial = dims[1:]
        affine_shape = (1, groups, c // groups) + (1,) * (nd - 2)
    else:
        view = shape
        dims = tuple(range(first_stat_dim, nd)) if groups == 0 else (0, *range(2, nd))
        partial = dims
        affine_shape = (1, c) + (1,) * (nd - 2)
    count = 1
    for d in dims:
        count *= view[d]
    return NormLayout(
        shape=shape,
        view_shape=view,
        stat_dims=dims,
        partial_dims=partial,
        affine_shape=affine_shape if affine else None,
        per_channel=True,
        count=count,
        param_shape=(c,) if affine else None,
    )


def _fits_channels(x: Tensor, tensors: tuple[Tensor | None, ...], params: int) -> bool:
    """Whether ``x`` is (N, C, *) and the first ``params`` of ``tensors`` (weight,
    bias) have shape (C,), the rest (running buffers) C elements."""
    if x.dim() < 2:
        return False
    c = x.shape[1]
    for i, t in enumerate(tensors):
        if t is not None and (tuple(t.shape) != (c,) if i < params else t.numel() != c):
            return False
    return True


def _graph_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """:func:`batch_norm` in training under torch.compile."""
    fits = _fits_channels(x, (weight, bias, running_mean, running_var), 2)
    if not (fits and x.numel() != x.shape[1] and eps > 0):
        _batch_norm_layout(x, running_mean, running_var, weight, bias, eps)  # raises
    layout = _channel_layout(x, -1, weight is not None or bias is not None, 0)
    factor = _update_factor(momentum, num_batches_tracked, running_mean is not None)
    y, mean, var = _autograd.GraphNormalizeFunction.apply(x, weight, bias, layout, float(eps), True)
    if running_mean is not None or running_var is not None:
        # running = (1 - m) · running + m · batch, unbiased variance (as _update_running).
        m = layout.count
        bessel = m / max(m - 1, 1)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.lerp_(mean.reshape(-1).to(running_mean.dtype), factor)
            if running_var is not None:
                running_var.lerp_((var.reshape(-1) * bessel).to(running_var.dtype), factor)
    return y


def _graph_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """:func:`group_norm` under torch.compile."""
    fits = type(num_groups) is int and _fits_channels(x, (weight, bias), 2)
    fits = fits and num_groups >= 1 and x.shape[1] % num_groups == 0
    if not (fits and x.numel() != num_groups and 0.0 < eps < 1e308):
        _group_norm_layout(x, num_groups, weight, bias, eps)  # raises
    layout = _channel_layout(x, num_groups, weight is not None or bias is not None, 1)
    y, _, _ = _autograd.GraphNormalizeFunction.apply(x, weight, bias, layout, float(eps), True)
    return y


def _graph_instance_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of :func:`instance_norm` under torch.compile, the statistics
    (N, C); the caller checked the shapes."""
    if not 0.0 < eps < 1e308:
        _check_eps(eps)
    layout = _channel_layout(x, 0, weight is not None or bias is not None, 2)
    y, mean, var = _autograd.GraphNormalizeFunction.apply(x, weight, bias, layout, float(eps), True)
    dims = layout.stat_dims
    return y, mean.squeeze(dims), var.squeeze(dims)


# --------------------------------------------------------------------------------------
# The pure core: layout, forward, backward
# --------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class NormLayout:
    """How ``x`` is viewed and reduced; resolved once from shapes by :func:`resolve_layout`.

    Attributes:
        shape: the shape of ``x``.
        view_shape: ``x``'s shape with the channel dim split into (G, C // G) when
            grouped, else ``shape``. All the math runs on this view.
        stat_dims: the dims of the view that one statistic reduces over.
        partial_dims: ``stat_dims`` minus the within-group channel dim: per-channel
            partial sums over them, then a sum over the channels of a group, give the
            group sums without a full-size ``g · w`` temporary.
        affine_shape: the shape ``weight``/``bias`` are viewed as to broadcast against
            the view (left-padded with ones to its rank), or None without affine.
        per_channel: the affine is constant over ``partial_dims``, so the forward
            and backward can fold it into per-group coefficients (one fused pass);
            False for a trailing-shape affine over reduced dims (LayerNorm), whose
            backward works element-wise.
        count: M, the number of elements per statistic.
        param_shape: the shape of ``weight``/``bias`` as given, or None.
    """

    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    stat_dims: tuple[int, ...]
    partial_dims: tuple[int, ...]
    affine_shape: tuple[int, ...] | None
    per_channel: bool
    count: int
    param_shape: tuple[int, ...] | None = None

    def __hash__(self) -> int:
        # Layouts key caches on every call (the native kernels' plans): hash the
        # fields once, not on every lookup.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def affine_dims(self) -> tuple[int, ...]:
        """Dims of the view along which the affine is constant (dw, db sum over them)."""
        if self.affine_shape is None:
            return tuple(range(len(self.view_shape)))
        return tuple(d for d, n in enumerate(self.affine_shape) if n == 1)


def resolve_layout(
    shape: Sequence[int],
    reduce_dims: Dims,
    *,
    groups: int | None = None,
    channel_dim: int | None = 1,
    weight_shape: Sequence[int] | None = None,
    bias_shape: Sequence[int] | None = None,
) -> NormLayout:
    """Check the arguments of :func:`normalize` against ``x``'s shape and resolve the view.

    Layouts are remembered per argument set (eagerly; not under torch.compile, which
    sees symbolic shapes): resolving costs more than a small normalization itself.

    Raises:
        ValueError: bad dims, groups that do not divide the channels, an affine whose
            shape does not fit.
    """
    if torch.compiler.is_compiling():
        return _resolve_layout(shape, reduce_dims, groups, channel_dim, weight_shape, bias_shape)
    key = (
        tuple(shape),
        reduce_dims if isinstance(reduce_dims, int) else tuple(reduce_dims),
        groups,
        channel_dim,
        None if weight_shape is None else tuple(weight_shape),
        None if bias_shape is None else tuple(bias_shape),
    )
    layout = _layouts.get(key)
    if layout is None:
        layout = _resolve_layout(*key)
        if len(_layouts) > 4096:  # many shapes seen: start over rather than grow forever
            _layouts.clear()
        _layouts[key] = layout
    return layout


_layouts: dict[tuple, NormLayout] = {}


def _remembered(key: tuple) -> NormLayout | None:
    """The layout a wrapper resolved for ``key`` (its arguments' shapes and ints) on an
    earlier call, whose shape checks then passed; None the first time, and always under
    torch.compile (symbolic shapes). Checking again costs more than a small
    normalization itself; checks of values (eps) still run on every call."""
    if torch.compiler.is_compiling():
        return None
    return _layouts.get(key)


def _remember(key: tuple, layout: NormLayout) -> None:
    if torch.compiler.is_compiling():
        return
    if len(_layouts) > 4096:  # many shapes seen: start over rather than grow forever
        _layouts.clear()
    _layouts[key] = layout


def _resolve_layout(
    shape: Sequence[int],
    reduce_dims: Dims,
    groups: int | None,
    channel_dim: int | None,
    weight_shape: Sequence[int] | None,
    bias_shape: Sequence[int] | None,
) -> NormLayout:
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    dims = _normalize_dims(reduce_dims, ndim, "reduce_dims")
    affine = weight_shape if weight_shape is not None else bias_shape
    if weight_shape is not None and bias_shape is not None:
        if tuple(weight_shape) != tuple(bias_shape):
            raise ValueError(
                f"weight and bias must have the same shape, got {tuple(weight_shape)} "
                f"and {tuple(bias_shape)}"
            )

    if channel_dim is None:
        if groups is not None:
            raise ValueError("groups splits the channel dim: pass channel_dim (an int) with it")
        affine_shape = None
        if affine is not None:
            affine = tuple(affine)
            if len(affine) > ndim or shape[ndim - len(affine) :] != affine:
                raise ValueError(
                    f"with channel_dim=None the affine weight/bias must match the trailing "
                    f"dims of the input: got shape {affine} for input shape {shape}"
                )
            affine_shape = (1,) * (ndim - len(affine)) + affine
        view_shape, stat_dims, partial_dims = shape, dims, dims
    else:
        c = _normalize_dims(channel_dim, ndim, "channel_dim")[0]
        channels = shape[c]
        if groups is None and c in dims:
            groups = 1
        if groups is not None:
            if c not in dims:
                raise ValueError(
                    f"groups={groups} normalizes groups of channels together, so "
                    f"reduce_dims must include channel_dim={c}; got reduce_dims={dims}"
                )
            if not isinstance(groups, int) or groups < 1 or channels % groups != 0:
                raise ValueError(
                    f"groups must be a positive int that divides the {channels} channels "
                    f"of dim {c}, got {groups!r}"
                )
            view_shape = (*shape[:c], groups, channels // groups, *shape[c + 1 :])
            stat_dims = tuple(d if d < c else d + 1 for d in dims)
            partial_dims = tuple(d for d in stat_dims if d != c + 1)
            channel_view: tuple[int, ...] = (groups, channels // groups)
        else:
            view_shape, stat_dims, partial_dims = shape, dims, dims
            channel_view = (channels,)
        affine_shape = None
        if affine is not None:
            if math.prod(affine) != channels or len(tuple(affine)) != 1:
                raise ValueError(
                    f"the affine weight/bias must have shape ({channels},), one value per "
                    f"channel of dim {c} of the input {shape}; got {tuple(affine)}"
                )
            affine_shape = (1,) * c + channel_view + (1,) * (ndim - c - 1)

    per_channel = affine_shape is None or all(affine_shape[d] == 1 for d in partial_dims)
    return NormLayout(
        shape=shape,
        view_shape=view_shape,
        stat_dims=stat_dims,
        partial_dims=partial_dims,
        affine_shape=affine_shape,
        per_channel=per_channel,
        count=_count(view_shape, stat_dims),
        param_shape=None if affine is None else tuple(int(n) for n in affine),
    )


def normalize_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Forward pass. Returns ``(y, mean, rstd, var)``.

    ``mean`` (None without mean subtraction), ``rstd = 1/sqrt(var + eps)`` and the
    biased ``var`` keep the reduced dims of the view as size 1 and are in the compute
    dtype. The backward needs ``x``, ``mean`` and ``rstd`` (and ``weight``), nothing
    full-size beyond ``x`` itself.

    Per channel (BatchNorm, GroupNorm, InstanceNorm) the normalization and the affine
    fold into one scale ``y = (x - μ) · (rstd · w) + b``; for a trailing affine
    (LayerNorm) ``y = ((x - μ) · rstd) · w + b``. With grad mode off on the CPU (as in
    the autograd wrapper) this runs in the fused native kernels (:mod:`._native`) when
    they apply and build, else piecewise in place (``_fwd_fast``); otherwise, on GPUs
    and under torch.compile, with plain out-of-place ops (``_fwd_graph``).
    """
    if torch.is_grad_enabled():
        return _fwd_graph(x, weight, bias, layout, eps, subtract_mean)
    out = _native.forward(x, weight, bias, layout, eps, subtract_mean)
    if out is not None:
        return out
    plan = _chunk_plan(layout, x, compute_dtype(x.dtype))
    if plan is None:
        return _fwd_graph(x, weight, bias, layout, eps, subtract_mean)
    return _fwd_fast(x, weight, bias, layout, eps, subtract_mean, plan)


def normalize_bwd(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward: ``(dx, dweight, dbias)`` (None where ``needs`` is False).

    With g the incoming gradient, M the count, x̂ = (x - μ)·rstd and per group sums Σ::

        dbias   = Σ_{not affine dims} g
        dweight = Σ_{not affine dims} g · x̂
        dx      = rstd · (g·w - Σ(g·w)/M - x̂ · Σ(g·w·x̂)/M)      (with mean subtraction)
        dx      = rstd · (g·w - x̂ · Σ(g·w·x̂)/M)                  (RMS: μ = 0)

    With grad mode on (the autograd wrapper under ``create_graph``, after recomputing
    ``mean``/``rstd`` from ``x`` differentiably) it uses plain out-of-place ops, which
    autograd differentiates again: double backward. With grad mode off on the CPU it
    computes the same terms in the fused native kernels (:mod:`._native`), or piecewise
    in place (``_bwd_fast``) where they do not apply. See docs/derivations.md.
    """
    if torch.is_grad_enabled():
        return _bwd_graph(grad_out, x, mean, rstd, weight, layout, needs)
    out = _native.backward(grad_out, x, mean, rstd, weight, layout, needs)
    if out is not None:
        return out
    plan = _chunk_plan(layout, x, rstd.dtype)
    if plan is None:
        return _bwd_graph(grad_out, x, mean, rstd, weight, layout, needs)
    return _bwd_fast(grad_out, x, mean, rstd, weight, layout, needs, plan)


def _fwd_graph(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Forward with plain out-of-place ops (differentiable; also what torch.compile sees).

    Written out flat (no helpers, tensor methods over ``torch.*``): Dynamo guards on
    every function and global it looks up, on each call of the compiled layer."""
    xf = x.reshape(layout.view_shape).to(torch.promote_types(x.dtype, torch.float32))
    dims, m = layout.stat_dims, layout.count
    if subtract_mean:  # (as _stats: two passes)
        mean = xf.sum(dims, keepdim=True) / m
        xc = xf - mean
    else:
        mean, xc = None, xf
    var = (xc * xc).sum(dims, keepdim=True) / m
    rstd = (var + eps).rsqrt()
    w = b = None
    if weight is not None:
        w = weight.to(xf.dtype).reshape(layout.affine_shape)
    if bias is not None:
        b = bias.to(xf.dtype).reshape(layout.affine_shape)
    if layout.per_channel:
        y = xc * (rstd if w is None else rstd * w)  # the scale is small: 1 on partial dims
    else:
        y = xc * rstd if w is None else (xc * rstd) * w
    if b is not None:
        y = y + b
    return y.to(x.dtype).reshape(layout.shape), mean, rstd, var


def _bwd_graph(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward with plain out-of-place ops: differentiable, for double backward."""
    need_dx, need_dw, need_db = needs
    subtract_mean = mean is not None
    dtype = rstd.dtype
    xv = x.reshape(layout.view_shape).to(dtype)
    gv = grad_out.reshape(layout.view_shape).to(dtype)
    w = None if weight is None else weight.to(dtype).reshape(layout.affine_shape)
    xc = xv - mean if subtract_mean else xv
    m = layout.count
    dx = dw = db = None

    if layout.per_channel:
        # Per-channel partial sums, then sums over the channels of a group.
        pdims = layout.partial_dims
        in_group = tuple(d for d in layout.stat_dims if d not in pdims)
        sum_g = _sum(gv, pdims) if (need_db or subtract_mean) else None
        sum_gxc = _sum(gv * xc, pdims)
        if need_db:
            assert sum_g is not None
            db = _sum(sum_g, layout.affine_dims)
        if need_dw:
            dw = _sum(sum_gxc * rstd, layout.affine_dims)
        if need_dx:
            a = rstd if w is None else rstd * w  # (1 on partial dims)
            # Group sums of g·w·x̂ (times 1/rstd) and of g·w.
            s2 = _sum(sum_gxc if w is None else sum_gxc * w, in_group)
            coef_x = -(rstd * rstd * rstd / m) * s2
            # dx = a·g + coef_x·(x - μ) + coef_c, with per-group coefficients.
            dx = gv * a + coef_x * xc
            if subtract_mean:
                assert sum_g is not None
                s1 = _sum(sum_g if w is None else sum_g * w, in_group)
                dx = dx - (rstd / m) * s1
    else:
        # Element-wise affine over reduced dims (LayerNorm, RMSNorm).
        sdims = layout.stat_dims
        xhat = xc * rstd
        if need_db:
            db = _sum(gv, layout.affine_dims)
        if need_dw:
            dw = _sum(gv * xhat, layout.affine_dims)
        if need_dx:
            gw = gv if w is None else gv * w
            s2 = (gw * xhat).sum(sdims, keepdim=True) * (rstd / m)
            # dx = rstd·gw - rstd·Σgw/M - x̂·rstd·Σ(gw·x̂)/M
            dx = gw * rstd - s2 * xhat
            if subtract_mean:
                dx = dx - gw.sum(sdims, keepdim=True) * (rstd / m)

    if dx is not None:
        dx = dx.to(x.dtype).reshape(layout.shape)
    if dw is not None:
        assert layout.param_shape is not None
        dw = dw.reshape(layout.param_shape)
    if db is not None:
        assert layout.param_shape is not None
        db = db.reshape(layout.param_shape)
    return dx, dw, db


# --------------------------------------------------------------------------------------
# The fast path (CPU, no grad mode): outputs allocated once, the rest in cache-sized
# chunks whose temporaries live in a small reusable per-thread workspace
# --------------------------------------------------------------------------------------

# Chunks of about this many bytes (in the compute dtype). A chunk's temporaries
# (x - μ, g · x̂, ...) stay in cache between the passes that use them, and they are
# written with ``out=`` into a workspace reused across calls: fresh whole-size
# temporaries would each cost a trip to memory and, once the allocator hands the
# pages back to the OS, page faults that cost more than the arithmetic.
_CHUNK_BYTES = 2 * 2**20
# Pieces never exceed this (the workspace holds four of them per thread and dtype);
# inputs that cannot be cut that small take the plain path.
_MAX_PIECE_BYTES = 8 * 2**20
_workspace = threading.local()


def _scratch(count: int, shape: Sequence[int], dtype: torch.dtype) -> list[Tensor]:
    """``count`` contiguous buffers of ``shape`` in ``dtype``, reused across calls.

    Per thread and dtype, grown to the largest piece seen: at most four pieces of
    ``_MAX_PIECE_BYTES``, usually four of about ``_CHUNK_BYTES`` (8 MB).
    """
    pool: dict[torch.dtype, list[Tensor]] = getattr(_workspace, "pool", None) or {}
    _workspace.pool = pool
    numel = math.prod(shape)
    bufs = pool.get(dtype, [])
    if len(bufs) < count or bufs[0].numel() < numel:
        size = max(numel, bufs[0].numel() if bufs else 0)
        bufs = [torch.empty(size, dtype=dtype) for _ in range(max(count, len(bufs)))]
        pool[dtype] = bufs
    return [b[:numel].view(shape) for b in bufs[:count]]


def _chunk_plan(layout: NormLayout, x: Tensor, dtype: torch.dtype) -> tuple[int, int] | None:
    """``(dim, step)``: split the view along ``dim`` (not reduced) in pieces of ``step``.

    Every piece holds whole statistics groups, so pieces are independent. None (use
    the plain path) where :func:`._native.cpu_eager` says no: off the CPU, where the
    caching allocator makes temporaries cheap, and under torch.compile.
    """
    if not _native.cpu_eager(x):
        return None
    total = x.numel() * torch.empty((), dtype=dtype).element_size()
    shape = layout.view_shape
    for d, n in enumerate(shape):
        if d not in layout.stat_dims and n > 1:
            if total // n > _MAX_PIECE_BYTES:
                return None  # one slice alone is big: no workspace that size
            return d, max(1, _CHUNK_BYTES // (total // n))
    return (0, shape[0]) if total <= _MAX_PIECE_BYTES else None  # one piece


def _pieces(t: Tensor | None, dim: int, step: int, count: int) -> Sequence[Tensor | None]:
    """``t`` split along ``dim`` into ``count`` pieces in one call, or repeated if it
    broadcasts along ``dim``. (Per-piece ``narrow`` calls would cost more than the
    arithmetic on small pieces: every torch call is a few microseconds.)"""
    if t is None or t.dim() <= dim or t.shape[dim] == 1:
        return [t] * count
    return t.split(step, dim)


def _fwd_fast(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool,
    plan: tuple[int, int],
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    dtype = compute_dtype(x.dtype)
    m = layout.count
    sdims = layout.stat_dims
    dim, step = plan
    xv = x.reshape(layout.view_shape)
    y = torch.empty_like(xv)  # the one full-size allocation; keeps x's memory format
    w = _affine_view(weight, layout, dtype)
    b = _affine_view(bias, layout, dtype)
    same = x.dtype == dtype  # else: half input, float32 work in the workspace
    means, rstds, variances = [], [], []
    xs, ys = xv.split(step, dim), y.split(step, dim)
    ws, bs = _pieces(w, dim, step, len(xs)), _pieces(b, dim, step, len(xs))
    bufs: list[Tensor] = []
    for xin, out, wc, bc in zip(xs, ys, ws, bs, strict=True):
        if not bufs or bufs[0].shape != xin.shape:
            bufs = _scratch(3, xin.shape, dtype)
        sq, xbuf, wbuf = bufs
        xf = xin if same else xbuf.copy_(xin)
        work = out if same else wbuf
        # Two passes: μ, then σ² = mean((x - μ)²). The deviations are written straight
        # into the output chunk, and every later step works in place on it (in-place
        # ops run several times faster than out-of-place ones with broadcasting).
        if subtract_mean:
            mean = xf.sum(sdims, keepdim=True).div_(m)
            torch.sub(xf, mean, out=work)
        else:
            mean = None
            work.copy_(xf)
        var = torch.mul(work, work, out=sq).sum(sdims, keepdim=True).div_(m)
        rstd = (var + eps).rsqrt_()
        if layout.per_channel:
            work.mul_(rstd if wc is None else rstd * wc)  # y = (x - μ)·(rstd·w) + b
        else:
            work.mul_(rstd)
            if wc is not None:
                work.mul_(wc)
        if bc is not None:
            work.add_(bc)
        if work is not out:
            out.copy_(work)
        means.append(mean)
        rstds.append(rstd)
        variances.append(var)
    mean = None if means[0] is None else _join(means, dim)
    return y.reshape(layout.shape), mean, _join(rstds, dim), _join(variances, dim)


def _bwd_fast(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
    needs: tuple[bool, bool, bool],
    plan: tuple[int, int],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    need_dx, need_dw, need_db = needs
    dtype = rstd.dtype
    m = layout.count
    dim, step = plan
    xv = x.reshape(layout.view_shape)
    gv = grad_out.reshape(layout.view_shape)
    w = _affine_view(weight, layout, dtype)
    dx = torch.empty_like(xv) if need_dx else None
    same = x.dtype == dtype and grad_out.dtype == dtype
    dw_parts: list[Tensor] = []
    db_parts: list[Tensor] = []
    pdims, sdims = layout.partial_dims, layout.stat_dims
    in_group = tuple(d for d in sdims if d not in pdims)
    xs, gs = xv.split(step, dim), gv.split(step, dim)
    k = len(xs)
    outs = dx.split(step, dim) if dx is not None else [None] * k
    mus, rss, wcs = (
        _pieces(mean, dim, step, k),
        _pieces(rstd, dim, step, k),
        _pieces(w, dim, step, k),
    )
    bufs: list[Tensor] = []
    for xin, gin, out, mu, rs, wc in zip(xs, gs, outs, mus, rss, wcs, strict=True):
        if not bufs or bufs[0].shape != xin.shape:
            bufs = _scratch(4, xin.shape, dtype)
        prod, gw, work, gf = bufs
        # The deviations x - μ go into the dx piece (when it has the compute dtype),
        # which later steps turn into dx in place.
        if same and out is not None:
            work = out
        g = gin if gin.dtype == dtype else gf.copy_(gin)
        xc = torch.sub(xin, mu, out=work) if mu is not None else work.copy_(xin)
        if layout.per_channel:
            sum_g = _psum(g, pdims) if (need_db or mu is not None) else None
            sum_gxc = _psum(torch.mul(g, xc, out=prod), pdims)
            if need_db:
                assert sum_g is not None
                db_parts.append(_sum(sum_g, layout.affine_dims))
            if need_dw:
                dw_parts.append(_sum(sum_gxc * rs, layout.affine_dims))
            if out is not None:
                # dx = a·g + coef_x·(x - μ) + coef_c, with per-group coefficients.
                a = rs if wc is None else rs * wc
                s2 = _sum(sum_gxc if wc is None else sum_gxc * wc, in_group)
                xc.mul_(-(rs * rs * rs / m) * s2)
                if mu is not None:
                    assert sum_g is not None
                    xc.sub_((rs / m) * _sum(sum_g if wc is None else sum_g * wc, in_group))
                xc.addcmul_(g, a)
                if xc is not out:
                    assert out is not None
                    out.copy_(xc)
        else:
            xhat = xc.mul_(rs)
            if need_db:
                db_parts.append(_psum(g, layout.affine_dims))
            gx = torch.mul(g, xhat, out=prod)
            if need_dw:
                dw_parts.append(_psum(gx, layout.affine_dims))
            if out is not None:
                # dx = rstd·g·w - x̂·rstd·Σ(g·w·x̂)/M - rstd·Σ(g·w)/M
                gwc = g if wc is None else torch.mul(g, wc, out=gw)
                s2 = _sum(gx if wc is None else gx.mul_(wc), sdims).mul_(rs / m)
                xhat.mul_(s2.neg_())
                if mu is not None:
                    xhat.sub_(_sum(gwc, sdims).mul_(rs / m))
                xhat.addcmul_(gwc, rs)
                if xhat is not out:
                    assert out is not None
                    out.copy_(xhat)
    dw = db = None
    if need_dw:
        assert layout.param_shape is not None
        dw = _join_sum(dw_parts, dim, layout).reshape(layout.param_shape)
    if need_db:
        assert layout.param_shape is not None
        db = _join_sum(db_parts, dim, layout).reshape(layout.param_shape)
    return (None if dx is None else dx.reshape(layout.shape)), dw, db


def _psum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # Like _sum, but never returns ``t`` itself: it may be a workspace buffer that the
    # next piece overwrites.
    return t.sum(dims, keepdim=True) if dims else t.clone()


def _join(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _join_sum(parts: list[Tensor], dim: int, layout: NormLayout) -> Tensor:
    # Chunks along a dim the affine is constant over contribute partial sums (add
    # them); along an affine dim they hold disjoint slices (concatenate them).
    if len(parts) == 1:
        return parts[0]
    if dim in layout.affine_dims:
        return torch.stack(parts).sum(0)
    return torch.cat(parts, dim)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _stats(
    xf: Tensor, layout: NormLayout, eps: float, subtract_mean: bool
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """``(mean, x - mean, var, rstd)`` over the stat dims, two passes, keepdim."""
    dims, m = layout.stat_dims, layout.count
    if subtract_mean:
        mean = xf.sum(dims, keepdim=True) / m
        xc = xf - mean
    else:
        mean, xc = None, xf
    var = (xc * xc).sum(dims, keepdim=True) / m
    rstd = torch.rsqrt(var + eps)
    return mean, xc, var, rstd


def recompute_stats(
    x: Tensor, layout: NormLayout, eps: float, subtract_mean: bool
) -> tuple[Tensor | None, Tensor]:
    """``(mean, rstd)`` of ``x`` with differentiable ops (for double backward)."""
    xf = x.reshape(layout.view_shape).to(compute_dtype(x.dtype))
    mean, _, _, rstd = _stats(xf, layout, eps, subtract_mean)
    return mean, rstd


def _affine_view(t: Tensor | None, layout: NormLayout, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    assert layout.affine_shape is not None
    return t.to(dtype).reshape(layout.affine_shape)


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # torch sums every dim when given an empty dim list; here empty means "no sum".
    if not dims:
        return t
    return t.sum(dims, keepdim=True)


def _count(shape: Sequence[int], dims: Sequence[int]) -> int:
    count = 1
    for d in dims:  # a loop, not a generator: torch.compile traces it
        count *= shape[d]
    return count


def _normalize_dims(dims: Dims, ndim: int, name: str) -> tuple[int, ...]:
    seq = (dims,) if isinstance(dims, int) else tuple(dims)
    if not seq:
        raise ValueError(f"{name} must name at least one dim, got {dims!r}")
    out = []
    for d in seq:
        if not isinstance(d, int) or not -ndim <= d < ndim:
            raise ValueError(
                f"{name} must be ints in [-{ndim}, {ndim - 1}] for a {ndim}D input, got {dims!r}"
            )
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a dim twice: {dims!r}")
    return tuple(sorted(out))


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite), got {eps!r}"
        )


def _verify_batch_size(size: Sequence[int]) -> None:
    per_channel = size[0] * math.prod(size[2:])
    if per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _verify_spatial_size(size: Sequence[int]) -> None:
    if math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {size}"
        )


def _check_trailing(
    x: Tensor, normalized_shape: int | Sequence[int], rms: bool = False
) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k :]) != shape:
        star = "*" if rms else "*, "
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[{star}{', '.join(map(str, shape))}], but got input of size{list(x.shape)}"
        )
    return shape


def _update_factor(
    momentum: float | None, num_batches_tracked: Tensor | None, tracking: bool
) -> float:
    if num_batches_tracked is not None and tracking:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return float(momentum)
    if not tracking:
        return 0.0
    if num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_batches_tracked, the step "
            "counter; pass it or give a float momentum"
        )
    return 1.0 / float(num_batches_tracked)


def _update_running(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    factor: float,
) -> None:
    # running = (1 - m) · running + m · batch (torch's convention, not Keras's), with
    # the unbiased variance (Bessel's correction M / (M - 1)) in running_var.
    bessel = count / max(count - 1, 1)
    if _native.update_running(running_mean, running_var, mean, var, factor, bessel):
        return  # one native call: four torch calls from Python cost more on small layers
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
        if running_var is not None:
            running_var.lerp_((var * bessel).to(running_var.dtype), factor)


def _affine_with_stats(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    channel_dim: int,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) · w + b`` with fixed per-channel statistics.

    The eval path: an affine map with constants, so plain differentiable ops.
    """
    dtype = compute_dtype(x.dtype)
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    y = torch.addcmul(shift.reshape(shape), x.to(dtype), scale.reshape(shape))
    return y.to(x.dtype)


from covshift.nn import _autograd, _native  # noqa: E402  (cycle: _autograd calls back into this module)
