"""The reference math of every layer, forward and backward, over a
:class:`~covshift.nn.layout.NormLayout`, numbered as docs/derivations.md::

    μ = Σx / M (1.1)   σ² = Σ(x - μ)² / M (1.2)   r = (σ² + ε)^(-1/2) (1.3)
    x̂ = (x - μ)·r (1.4)   y = x̂·w + b (1.5)          (μ = 0 for RMS, §4)

The backward: the closed form of §3-§6 in plain ops, which autograd differentiates
again (§9). Statistics in float32 at least, two-pass variance, ε inside the root (§10).
"""

from __future__ import annotations

import torch
from torch import Tensor

from covshift.nn import checks
from covshift.nn.layout import NormLayout, count

Needs = tuple[bool, bool, bool]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def two_pass(
    xf: Tensor, dims: tuple[int, ...], m: int, subtract_mean: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(μ, x - μ, σ²)`` over ``dims`` (keepdim), μ None for RMS: the mean, then the
    mean of squared deviations, which keeps the variance when |μ| ≫ σ (§10)."""
    if subtract_mean:
        mean = xf.sum(dims, keepdim=True) / m  # (1.1)
        xc = xf - mean
    else:
        mean, xc = None, xf  # §4: μ = 0
    var = (xc * xc).sum(dims, keepdim=True) / m  # (1.2); (4.1) without the mean
    return mean, xc, var


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(y, mean, rstd, var)`` of ``x`` over ``layout``, the statistics keepdim in the
    compute dtype: ``y = (x - μ) · (r · w) + b`` per channel, ``((x - μ) · r) · w + b``
    for a trailing affine (LayerNorm)."""
    xf = x.reshape(layout.view_shape).to(torch.promote_types(x.dtype, torch.float32))
    mean, xc, var = two_pass(xf, layout.stat_dims, layout.count, subtract_mean)
    rstd = (var + eps).rsqrt()  # (1.3)
    w, b = affine_view(weight, layout, xf.dtype), affine_view(bias, layout, xf.dtype)
    if layout.per_channel:
        y = xc * (rstd if w is None else rstd * w)  # (1.4)-(1.5); the scale is small
    else:
        y = xc * rstd if w is None else (xc * rstd) * w  # (1.4)-(1.5), element-wise w
    if b is not None:
        y = y + b  # (1.5)
    return y.to(x.dtype).reshape(layout.shape), mean, rstd, var


def backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
    needs: Needs = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form ``(dx, dweight, dbias)`` (None where not ``needs``), g = ``grad_out``,
    h = g·w (1.6): per channel (5.3) from partial sums (5.1); for LayerNorm's element-wise
    affine (6.2); without mean subtraction (``mean`` None) the Σh terms drop (4.2)."""
    need_dx, need_dw, need_db = needs
    subtract_mean = mean is not None
    dtype = rstd.dtype
    xv = x.reshape(layout.view_shape).to(dtype)
    gv = grad_out.reshape(layout.view_shape).to(dtype)
    w = affine_view(weight, layout, dtype)
    xc = xv - mean if subtract_mean else xv  # x - μ
    m = layout.count
    dx = dw = db = None

    if layout.per_channel:
        pdims = layout.partial_dims
        in_group = tuple(d for d in layout.stat_dims if d not in pdims)
        s1 = sum_dims(gv, pdims) if (need_db or subtract_mean) else None  # S1_c (5.1)
        s2 = sum_dims(gv * xc, pdims)  # S2_c (5.1)
        if need_db:
            assert s1 is not None
            db = sum_dims(s1, layout.affine_dims)  # (5.5)
        if need_dw:
            dw = sum_dims(s2 * rstd, layout.affine_dims)  # (5.5)
        if need_dx:
            a = rstd if w is None else rstd * w  # a_c (5.4)
            sum_hx = sum_dims(s2 if w is None else s2 * w, in_group)  # Σ h·x̂ / r (5.2)
            beta = -(rstd * rstd * rstd / m) * sum_hx  # β (5.4)
            dx = gv * a + beta * xc  # (5.3)
            if subtract_mean:
                assert s1 is not None
                sum_h = sum_dims(s1 if w is None else s1 * w, in_group)  # Σ h (5.2)
                dx = dx - (rstd / m) * sum_h  # + γ_c (5.3), (5.4)
    else:  # element-wise affine over reduced dims (LayerNorm, RMSNorm): §6
        sdims = layout.stat_dims
        xhat = xc * rstd  # (1.4)
        if need_db:
            db = sum_dims(gv, layout.affine_dims)  # (6.3)
        if need_dw:
            dw = sum_dims(gv * xhat, layout.affine_dims)  # (6.3)
        if need_dx:
            h = gv if w is None else gv * w  # (1.6)
            s2 = (h * xhat).sum(sdims, keepdim=True) * (rstd / m)  # (r/M)·S2 (6.1)
            dx = h * rstd - s2 * xhat  # (6.2)
            if subtract_mean:
                dx = dx - h.sum(sdims, keepdim=True) * (rstd / m)  # - (r/M)·S1 (6.2)

    dx = None if dx is None else dx.to(x.dtype).reshape(layout.shape)
    return dx, param_grad(dw, layout), param_grad(db, layout)


def affine_view(t: Tensor | None, layout: NormLayout, dtype: torch.dtype) -> Tensor | None:
    """``weight`` or ``bias`` in ``dtype``, viewed to broadcast against the layout's view."""
    return None if t is None else t.to(dtype).reshape(layout.affine_shape)


def param_grad(grad: Tensor | None, layout: NormLayout) -> Tensor | None:
    """The gradient of an affine view, in the parameter's own shape."""
    return None if grad is None else grad.reshape(layout.param_shape)  # type: ignore[arg-type]


def recompute_stats(
    x: Tensor, layout: NormLayout, eps: float, subtract_mean: bool
) -> tuple[Tensor | None, Tensor]:
    """``(mean, rstd)`` of ``x`` with differentiable ops, so that under
    ``create_graph=True`` the backward is a function of x through μ(x) and r(x) (§9)."""
    xf = x.reshape(layout.view_shape).to(compute_dtype(x.dtype))
    mean, _, var = two_pass(xf, layout.stat_dims, layout.count, subtract_mean)
    return mean, torch.rsqrt(var + eps)  # (1.3)


def moments(
    x: Tensor,
    reduce_dims: int | tuple[int, ...],
    *,
    keepdim: bool = False,
    subtract_mean: bool = True,
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``reduce_dims``, in float32 at least, by
    (1.1) then (1.2), differentiable; ``subtract_mean=False``: ``mean(x²)`` and zeros.

    Example:
        >>> mean, var = moments(torch.randn(8, 3, 4, 4), (0, 2, 3))  # (3,), (3,)
    """
    dims = checks.dims(reduce_dims, x.dim(), "reduce_dims")
    xf = x.to(compute_dtype(x.dtype))
    mean, _, var = two_pass(xf, dims, count(x.shape, dims), subtract_mean)
    mean = var.new_zeros(()).expand_as(var) if mean is None else mean
    if not keepdim:
        mean, var = mean.squeeze(dims), var.squeeze(dims)
    return mean, var


def affine_with_stats(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``y = x·s + t`` with fixed statistics per channel (dim 1), (8.1): BatchNorm's (and
    tracked InstanceNorm's) eval. An affine map with constants, so plain differentiable
    ops and autograd's own backward; nothing to gain from a hand-written one."""
    dtype = compute_dtype(x.dtype)
    shape = [1, x.shape[1], *[1] * (x.dim() - 2)]
    scale = torch.rsqrt(var.to(dtype) + eps)  # s = w / sqrt(running_var + ε)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale  # t = b - running_mean · s
    if bias is not None:
        shift = shift + bias.to(dtype)
    y = torch.addcmul(shift.reshape(shape), x.to(dtype), scale.reshape(shape))
    return y.to(x.dtype)


def sum_dims(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` summed over ``dims``, keepdim; ``t`` itself for no dims (torch would sum all)."""
    return t.sum(dims, keepdim=True) if dims else t
