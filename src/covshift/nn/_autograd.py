"""Thin ``torch.autograd.Function`` wrapper around the pure normalization math.

The forward saves ``x`` (the input, which is alive anyway), ``weight`` and the two
small statistics ``mean`` and ``rstd``; no full-size temporary. The backward is the
closed form of :func:`covshift.nn.functional.normalize_bwd`.

Double backward: under ``create_graph=True`` the backward runs with grad mode on.
The saved ``mean``/``rstd`` were computed without a graph, so they would look like
constants to the second differentiation and drop the terms that come from
``μ(x)`` and ``σ(x)``. The backward therefore recomputes them from ``x`` with
differentiable ops in that case, and ``normalize_bwd`` (plain, out-of-place torch
ops then) is differentiated by autograd like any other function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from covshift.nn import functional as F


def _save(
    ctx: Any,
    stats: tuple[Tensor, Tensor | None, Tensor, Tensor],
    x: Tensor,
    weight: Tensor | None,
    layout: F.NormLayout,
    eps: float,
    subtract_mean: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Save what the backward needs of ``(y, mean, rstd, var)``; return ``(y, mean, var)``."""
    y, mean, rstd, var = stats
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.layout = layout
    ctx.eps = eps
    ctx.subtract_mean = subtract_mean
    if mean is not None:
        ctx.mark_non_differentiable(mean, var)
    else:
        ctx.mark_non_differentiable(var)
    return y, mean, var


def _saved(ctx: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, tuple[bool, ...]]:
    """``(x, weight, mean, rstd, needs)`` for the backward; under ``create_graph=True``
    the statistics are recomputed as functions of ``x`` (see the module doc)."""
    x, weight, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        mean, rstd = F.recompute_stats(x, ctx.layout, ctx.eps, ctx.subtract_mean)
    return x, weight, mean, rstd, tuple(ctx.needs_input_grad[:3])


def _in_param_dtype(
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    grad_y: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """Gradients in the parameters' dtype (the compute dtype may be wider), padded with
    None for the non-tensor arguments."""
    dx, dw, db = grads
    if dw is not None and weight is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if db is not None:
        dtype = grad_y.dtype if weight is None else weight.dtype
        if db.dtype != dtype:
            db = db.to(dtype)
    return dx, dw, db, None, None, None


class NormalizeFunction(torch.autograd.Function):
    """``(y, mean, var) = normalize(x, weight, bias)``; ``mean``/``var`` carry no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        layout: F.NormLayout,
        eps: float,
        subtract_mean: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        stats = F.normalize_fwd(x, weight, bias, layout, eps, subtract_mean)
        return _save(ctx, stats, x, weight, layout, eps, subtract_mean)

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd, needs = _saved(ctx)
        grads = F.normalize_bwd(grad_y, x, mean, rstd, weight, ctx.layout, needs)
        return _in_param_dtype(grads, grad_y, weight)


class GraphNormalizeFunction(torch.autograd.Function):
    """:class:`NormalizeFunction` for torch.compile: the same saved tensors and the same
    closed-form backward, calling the plain-op graph functions directly.

    Under torch.compile Dynamo inlines everything a call reaches and guards on each
    function it inlined; the eager dispatch (native kernels, chunked path) is dead
    there but would still be traced through, so this class skips it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        layout: F.NormLayout,
        eps: float,
        subtract_mean: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        stats = F._fwd_graph(x, weight, bias, layout, eps, subtract_mean)
        return _save(ctx, stats, x, weight, layout, eps, subtract_mean)

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd, needs = _saved(ctx)
        grads = F._bwd_graph(grad_y, x, mean, rstd, weight, ctx.layout, needs)
        return _in_param_dtype(grads, grad_y, weight)
