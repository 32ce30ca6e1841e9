"""Weight Standardization (Qiao et al. 2019, arXiv 1903.10520).

Each output filter of a conv or linear layer is standardized over its fan-in
before use::

    W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)

with the biased variance over the ``fan_in = in_channels / groups * prod(kernel)``
entries of filter ``o``. Gradients flow through the standardization (it is part of
the layer's function, not a reparametrisation done once), which is what smooths the
loss landscape in the paper; combined with GroupNorm it matches large-batch BN at one
image per GPU.

Numeric choices: the biased variance with ``eps`` inside the square root (as BN does;
Qiao et al.'s code adds 1e-5 to the unbiased std instead), default ``eps = 1e-6``
because a filter's variance is small (about ``1 / (3 fan_in)`` under PyTorch's default
init, 7e-5 for a 3x3x512 filter) and a larger eps would visibly shrink it. Statistics
are computed in float32 at least, whatever the weight's dtype. The standardization
is the shared core's :func:`covshift.nn.functional.normalize` over each filter (a
LayerNorm over the fan-in without affine), so its backward is the hand-derived one
of docs/derivations.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from covshift.nn import functional as F

__all__ = ["WSConv2d", "WSLinear", "standardize_weight"]


def standardize_weight(weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardize every output filter of ``weight`` (dim 0) over all its other dims.

    Args:
        weight: a conv or linear weight, output channels first.
        eps: added to the biased variance before the square root (> 0).

    Shape:
        weight: ``(O, *)``; returns the same shape and dtype.

    Example:
        >>> w = standardize_weight(torch.randn(8, 3, 3, 3))
        >>> w.flatten(1).mean(1).abs().max() < 1e-6
        tensor(True)
    """
    flat = weight.reshape(weight.shape[0], -1)  # (O, fan_in)
    # The shared core: statistics in float32 at least, hand-derived (and twice
    # differentiable) backward, output in the weight's dtype.
    return F.normalize(flat, 1, eps=eps, channel_dim=None).view_as(weight)


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps the filter std away from 0), got {eps!r}")


class WSConv2d(nn.Conv2d):
    """Conv2d whose filters are standardized before every use (Weight Standardization).

    ``y = conv2d(x, (W - mean_o W) / sqrt(var_o W + eps), b)`` with the mean and the
    biased variance of each output filter ``o`` over ``(C_in / groups, kH, kW)``.
    Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and
    Weight Standardization" (arXiv 1903.10520).

    Args:
        Those of :class:`torch.nn.Conv2d`, and
        eps: added to each filter's variance before the square root. Default: 1e-6.

    Shape:
        Those of :class:`torch.nn.Conv2d`: ``(N, C_in, H, W) -> (N, C_out, H', W')``.

    Example:
        >>> conv = WSConv2d(3, 16, kernel_size=3, padding=1)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
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
        _check_eps(eps)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The weight actually used by :meth:`forward`, ``(C_out, C_in / groups, kH, kW)``."""
        return standardize_weight(self.weight, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class WSLinear(nn.Linear):
    """Linear layer whose rows are standardized before every use (Weight Standardization).

    ``y = x (W_hat)^T + b`` with ``W_hat[o] = (W[o] - mean W[o]) / sqrt(var W[o] + eps)``
    over the ``in_features`` entries of row ``o`` (biased variance). Qiao et al. 2019
    (arXiv 1903.10520) define it for convolutions; a linear layer is a 1x1 conv.

    Args:
        Those of :class:`torch.nn.Linear`, and
        eps: added to each row's variance before the square root. Default: 1e-6.

    Shape:
        ``(*, in_features) -> (*, out_features)``.

    Example:
        >>> fc = WSLinear(20, 5)
        >>> fc(torch.randn(4, 20)).shape
        torch.Size([4, 5])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_eps(eps)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The weight actually used by :meth:`forward`, ``(out_features, in_features)``."""
        return standardize_weight(self.weight, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        return TF.linear(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
