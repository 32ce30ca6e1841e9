"""The torch.compile path: one short function per layer kind, straight to the reference.

Under torch.compile each functional wrapper's first line sends it here (the
``compiled`` path of :mod:`covshift.nn.backend`). Dynamo inlines every Python function
a compiled call reaches and guards on each one (and on each global it read) on every
later call; it would also trace the eager choice's dead branches (native kernels,
remembered layouts), which cannot run while compiling. So these functions build the
layout straight from the shapes (:func:`.layout.channel_layout`,
:func:`.layout.trailing_layout`, the layouts :func:`.layout.resolve_layout` gives) and
call :class:`CompiledNormalizeFunction`, which saves the same tensors as the eager
Function and runs the reference forward and closed-form backward
(:mod:`covshift.nn.reference`) on plain out-of-place ops, which inductor fuses.

The eager checks (:mod:`covshift.nn.checks`, through the checked layouts) run only
where a cheap shape test fails, so a valid call inlines none of them and an invalid
one raises the eager error. docs/derivations.md §11.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from covshift.nn import checks, reference
from covshift.nn import layout as L
from covshift.nn import running as running_stats
from covshift.nn._autograd import in_param_dtype, save, saved

__all__ = [
    "CompiledNormalizeFunction",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "trailing_norm",
]


class CompiledNormalizeFunction(torch.autograd.Function):
    """The eager :class:`~covshift.nn.backend.NormalizeFunction`'s saved tensors and
    closed-form backward, calling the reference directly (no eager path choice)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        layout: L.NormLayout,
        eps: float,
        subtract_mean: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        stats = reference.forward(x, weight, bias, layout, eps, subtract_mean)
        return save(ctx, stats, x, weight, layout, eps, subtract_mean)

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd, needs = saved(ctx)
        grads = reference.backward(grad_y, x, mean, rstd, weight, ctx.layout, needs)
        return in_param_dtype(grads, grad_y, weight)


def trailing_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    subtract_mean: bool,
) -> Tensor:
    """``layer_norm`` (``subtract_mean``) or ``rms_norm``."""
    shape = tuple(x.shape)
    tail = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    lead = len(shape) - len(tail)
    fits = lead >= 0 and len(tail) > 0 and shape[lead:] == tail
    fits = fits and (weight is None or tuple(weight.shape) == tail)
    fits = fits and (bias is None or tuple(bias.shape) == tail)
    if not (fits and 0.0 < eps < 1e308):  # the eager checks raise the precise error
        layout = L.trailing_norm_layout(x, normalized_shape, weight, bias, eps, not subtract_mean)
        checks.eps(eps)
    else:
        layout = L.trailing_layout(shape, tail, weight is not None or bias is not None)
    y, _, _ = CompiledNormalizeFunction.apply(x, weight, bias, layout, float(eps), subtract_mean)
    return y


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


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """``batch_norm`` in training, with the running-statistics rule of §7."""
    fits = _fits_channels(x, (weight, bias, running_mean, running_var), 2)
    if not (fits and x.numel() != x.shape[1] and eps > 0):
        L.batch_norm_layout(x, running_mean, running_var, weight, bias, eps)  # raises
    layout = L.channel_layout(tuple(x.shape), -1, weight is not None or bias is not None)
    factor = running_stats.step_factor(momentum, num_batches_tracked, running_mean is not None)
    y, mean, var = CompiledNormalizeFunction.apply(x, weight, bias, layout, float(eps), True)
    if running_mean is not None or running_var is not None:
        bessel = running_stats.bessel(layout.count)
        running_stats.update(
            running_mean, running_var, mean.reshape(-1), var.reshape(-1), factor, bessel
        )
    return y


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``group_norm``."""
    fits = type(num_groups) is int and _fits_channels(x, (weight, bias), 2)
    fits = fits and num_groups >= 1 and x.shape[1] % num_groups == 0
    if not (fits and x.numel() != num_groups and 0.0 < eps < 1e308):
        L.group_norm_layout(x, num_groups, weight, bias, eps)  # raises
    affine = weight is not None or bias is not None
    layout = L.channel_layout(tuple(x.shape), num_groups, affine)
    y, _, _ = CompiledNormalizeFunction.apply(x, weight, bias, layout, float(eps), True)
    return y


def instance_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of ``instance_norm`` with the input statistics, these (N, C);
    the caller checked the shapes."""
    if not 0.0 < eps < 1e308:
        checks.eps(eps)
    layout = L.channel_layout(tuple(x.shape), 0, weight is not None or bias is not None)
    y, mean, var = CompiledNormalizeFunction.apply(x, weight, bias, layout, float(eps), True)
    dims = layout.stat_dims
    return y, mean.squeeze(dims), var.squeeze(dims)
