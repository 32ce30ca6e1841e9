"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu 2025, "Transformers without
Normalization", arXiv 2503.10622): a normalization layer without statistics.

::

    DyT(x) = γ ⊙ tanh(α · x) + β

(:class:`DyT`). The hand-written backward (docs/derivations.md §18, float32 at least):
with ``t = tanh(α x)``, ``h = g ⊙ γ``, ``s = 1 - t²``: ``dx = α · h · s``,
``dα = Σ h · s · x``, ``dγ = Σ g · t``, ``dβ = Σ g``; it saves only ``x`` and is
twice differentiable. No native kernel: one element-wise pass (torch.compile fuses it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from covshift.nn import checks, registry
from covshift.nn._base import NormVariant
from covshift.nn.reference import compute_dtype

__all__ = ["DyT", "dyt"]


class DyTFunction(torch.autograd.Function):
    """``y = γ ⊙ tanh(α x) + β`` over the trailing ``nd`` dims (γ, β may be None),
    with the closed-form backward of derivations §18 (module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        alpha: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        nd: int,
    ) -> Tensor:
        dtype = compute_dtype(x.dtype)
        t = torch.tanh(alpha.to(dtype) * x.to(dtype))  # (18.1)
        y = t if weight is None else t * weight.to(dtype)  # (18.2)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x, alpha, weight)
        ctx.nd = nd
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, alpha, weight = ctx.saved_tensors
        need_x, need_alpha, need_w, need_b = ctx.needs_input_grad[:4]
        dtype = compute_dtype(x.dtype)
        leading = tuple(range(x.dim() - ctx.nd))  # the dims γ and β are shared along
        g = grad_y.to(dtype)
        # t is recomputed from x (nothing full-size saved but x); in differentiable
        # ops, so that a create_graph backward differentiates through α and x.
        t = torch.tanh(alpha.to(dtype) * x.to(dtype))  # (18.1)
        h = g if weight is None else g * weight.to(dtype)  # (18.3)
        dx = d_alpha = dw = db = None
        if need_x or need_alpha:
            hs = h * (1 - t * t)  # ∂L/∂u with u = α x: tanh' = 1 - tanh² (18.4)
            if need_x:
                dx = (hs * alpha.to(dtype)).to(x.dtype)  # (18.5)
            if need_alpha:
                d_alpha = (hs * x.to(dtype)).sum().to(alpha.dtype)  # (18.6)
        if need_w and weight is not None:
            dw = _sum(g * t, leading).to(weight.dtype)  # (18.7)
        if need_b:
            db = _sum(g, leading).to(ctx.bias_dtype)  # (18.8)
        return dx, d_alpha, dw, db, None


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # (sum over an empty tuple of dims would reduce every dim: an unbatched input)
    return t.sum(dims) if dims else t


def dyt(
    x: Tensor,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    normalized_shape: Sequence[int] | None = None,
) -> Tensor:
    """Dynamic Tanh of ``x`` ``(*, *normalized_shape)``: ``weight ⊙ tanh(alpha · x) +
    bias``, ``alpha`` a 0-d tensor, ``weight``, ``bias`` of ``normalized_shape`` or None
    (default ``normalized_shape``: theirs, else the last dim of ``x``)."""
    if alpha.dim() != 0:
        raise ValueError(f"alpha must be a 0-d tensor (one scalar), got shape {tuple(alpha.shape)}")
    affine = weight if weight is not None else bias
    if normalized_shape is None:
        normalized_shape = tuple(affine.shape) if affine is not None else (x.shape[-1],)
    shape = checks.trailing_shape(x, normalized_shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have the shape normalized_shape={list(shape)}, got {list(t.shape)}"
            )
    return DyTFunction.apply(x, alpha, weight, bias, len(shape))


def _alpha_init(value: float) -> float:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value > 0):
        raise ValueError(
            "alpha_init must be a positive finite float (the initial slope of tanh(alpha * x) "
            f"at 0; the paper uses 0.5, less for wide language models), got {value!r}"
        )
    return float(value)


class DyT(NormVariant):
    """Dynamic Tanh (Zhu et al. 2025, arXiv 2503.10622): ``γ ⊙ tanh(α x) + β``.

    A drop-in for LayerNorm (its arguments and parameter names, so its affine carries
    over) without statistics: α one learned scalar (initially ``alpha_init``, > 0; 0.5
    is the paper's, smaller for wider language models), γ ones and β zeros over
    ``normalized_shape``. Half-precision inputs are computed in float32.

    Example: ``DyT(768, alpha_init=0.5)(torch.randn(4, 10, 768))``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        alpha_init: float = 0.5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = checks.normalized_shape(normalized_shape)
        self.alpha_init = _alpha_init(alpha_init)
        self.elementwise_affine = bool(elementwise_affine)
        self.alpha = nn.Parameter(torch.empty((), **factory))  # type: ignore[arg-type]
        self.register_affine(self.normalized_shape, self.elementwise_affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """α = ``alpha_init``, γ = 1, β = 0."""
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
        super().reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        return dyt(input, self.alpha, self.weight, self.bias, self.normalized_shape)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, alpha_init={self.alpha_init}, "
            f"elementwise_affine={self.elementwise_affine}"
        )


def _build(num_features: int, *, dims: int, **kw: Any) -> nn.Module:
    if dims != 1:
        raise ValueError(
            f"dyt acts on the trailing features of (N, ..., C) values (dims=1); got dims={dims}: "
            "for channels-first images permute them to channels-last, or use another norm"
        )
    return DyT(num_features, **kw)


registry.register_kind(registry.NormKind("dyt", {None: DyT}, trailing=True), _build)
