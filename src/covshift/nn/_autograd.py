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
        y, mean, rstd, var = F.normalize_fwd(x, weight, bias, layout, eps, subtract_mean)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.layout = layout
        ctx.eps = eps
        ctx.subtract_mean = subtract_mean
        if mean is not None:
            ctx.mark_non_differentiable(mean, var)
        else:
            ctx.mark_non_differentiable(var)
        return y, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: make the statistics functions of x again (see module doc).
            mean, rstd = F.recompute_stats(x, ctx.layout, ctx.eps, ctx.subtract_mean)
        dx, dw, db = F.normalize_bwd(
            grad_y, x, mean, rstd, weight, ctx.layout, (need_x, need_w, need_b)
        )
        # Gradients in the parameters' dtype (the compute dtype may be wider).
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if db is not None:
            dtype = grad_y.dtype if weight is None else weight.dtype
            if db.dtype != dtype:
                db = db.to(dtype)
        return dx, dw, db, None, None, None
