"""What the normalization autograd Functions save and how their backward reads it.

Shared by the eager Python path (:class:`covshift.nn.backend.NormalizeFunction`) and
the torch.compile path (:class:`covshift.nn.compiled.CompiledNormalizeFunction`), which
differ only in the forward and backward they run. The forward saves ``x`` (the
input, which is alive anyway), ``weight`` and the two small statistics ``mean`` and
``rstd``; no full-size temporary.

Double backward (docs/derivations.md §9): under ``create_graph=True`` the backward
runs with grad mode on. The saved ``mean``/``rstd`` were computed without a graph, so
they would look like constants to the second differentiation and drop the terms that
come from μ(x) and σ(x). :func:`saved` therefore recomputes them from ``x`` with
differentiable ops in that case, and the reference backward (plain, out-of-place
torch ops) is differentiated by autograd like any other function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from covshift.nn.layout import NormLayout
from covshift.nn.reference import recompute_stats

__all__ = ["in_param_dtype", "save", "saved"]


def save(
    ctx: Any,
    stats: tuple[Tensor, Tensor | None, Tensor, Tensor],
    x: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
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


def saved(ctx: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, tuple[bool, ...]]:
    """``(x, weight, mean, rstd, needs)`` for the backward; under ``create_graph=True``
    the statistics are recomputed as functions of ``x`` (see the module doc)."""
    x, weight, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        mean, rstd = recompute_stats(x, ctx.layout, ctx.eps, ctx.subtract_mean)
    return x, weight, mean, rstd, tuple(ctx.needs_input_grad[:3])


def in_param_dtype(
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
