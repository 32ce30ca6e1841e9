"""Weight Standardization (Qiao et al. 2019, arXiv 1903.10520).

Each output filter standardized over its fan-in before every use by the core (§16),
``Ŵ[o] = (W[o] - mean W[o]) / sqrt(var W[o] + eps)`` (biased; eps 1e-6: a filter's
variance is about 1 / (3 fan_in)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from covshift.nn import checks
from covshift.nn import functional as F

__all__ = ["WSConv2d", "WSLinear", "standardize_weight"]


def standardize_weight(weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardize every output filter of ``weight`` ``(O, *)`` over its fan-in, eps
    added to the biased variance: ``standardize_weight(w).flatten(1).mean(1)`` is ~0."""
    flat = weight.reshape(weight.shape[0], -1)  # (O, fan_in)
    return F.normalize(flat, 1, eps=eps, channel_dim=None).view_as(weight)


class _Standardized:
    """The weight :meth:`forward` uses, and ``eps`` (set by the constructors) in the repr."""

    weight: Tensor
    eps: float

    def standardized_weight(self) -> Tensor:
        """The weight actually used by ``forward``: the layer's, each filter standardized."""
        return standardize_weight(self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"  # type: ignore[misc]


class WSConv2d(_Standardized, nn.Conv2d):
    """Conv2d whose filters are standardized before every use (Qiao et al. 2019,
    arXiv 1903.10520): ``y = conv2d(x, (W - mean_o W) / sqrt(var_o W + eps), b)`` over
    each output filter ``o``. torch.nn.Conv2d's arguments, and ``eps`` (default 1e-6).
    Example: ``WSConv2d(3, 16, kernel_size=3, padding=1)(torch.randn(2, 3, 8, 8))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.eps = checks.eps_arg(eps)  # (before torch's constructor: a bad eps fails first)
        conv = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        super().__init__(*conv, padding_mode, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)


class WSLinear(_Standardized, nn.Linear):
    """Linear layer (a 1x1 conv) whose rows are standardized before every use (Qiao et al.
    2019): ``y = x Ŵᵀ + b``, ``Ŵ[o] = (W[o] - mean W[o]) / sqrt(var W[o] + eps)``.
    torch.nn.Linear's arguments, and ``eps`` (default 1e-6). Example: ``WSLinear(20, 5)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.eps = checks.eps_arg(eps)
        super().__init__(in_features, out_features, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return TF.linear(input, self.standardized_weight(), self.bias)
