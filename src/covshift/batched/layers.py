"""The layers of K members as one layer: a Linear as a batched matmul, a conv as a
grouped conv.

Two layouts carry the members' values through a batched network:

- *rows* ``(K, B, F)``: member ``k``'s batch of ``B`` rows of ``F`` features is
  ``x[k]`` (fully connected networks);
- *channels* ``(B, K*C, H, W)``: member ``k``'s ``C`` channels are the block
  ``x[:, k*C:(k+1)*C]`` (convolutional networks), so that every per-channel operation
  (a grouped conv, BatchNorm, pooling) treats each member apart.

No operation here mixes members: member ``k``'s outputs and gradients depend on its
own inputs and parameters alone, which is what lets a member's numbers be those of its
own one-at-a-time run (up to the rounding of a batched matmul or a grouped conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchedConv2d", "BatchedLinear", "channels_to_rows", "rows_to_channels"]


class BatchedLinear(nn.Module):
    """``K`` Linear layers, each on its own member's rows: ``y_k = x_k W_k^T + b_k``.

    Args:
        members: K.
        in_features, out_features: those of one member's Linear.
        bias: whether each member has a bias.

    Shape:
        Input ``(K, B, in_features)`` (any strides); output ``(K, B, out_features)``.

    One ``baddbmm`` (``bmm`` without bias) computes all members: forward
    ``x_k W_k^T + b_k`` and, through autograd, ``dW_k = dy_k^T x_k``,
    ``db_k = sum_b dy_k``, ``dx_k = dy_k W_k``; the matmuls of one member never read
    another's rows.
    """

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.members = members
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(members, out_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[0] != self.members or x.shape[2] != self.in_features:
            raise RuntimeError(
                f"BatchedLinear of {self.members} members expects (K={self.members}, B, "
                f"{self.in_features}), got {tuple(x.shape)}"
            )
        # Rows packed densely (a member's rows one after another, as in a contiguous or
        # a broadcast input): the batched matmul then sees the same leading dimension
        # whatever K is, so a member's result does not depend on how many share the call.
        if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
            x = x.contiguous()
        weight_t = self.weight.transpose(1, 2)  # (K, in, out)
        if self.bias is None:
            return torch.bmm(x, weight_t)
        return torch.baddbmm(self.bias.unsqueeze(1), x, weight_t)

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class BatchedConv2d(nn.Module):
    """``K`` Conv2d layers on the channels layout: one grouped convolution whose groups
    are the members' (``K * groups`` groups of the member's own grouping).

    Args:
        conv: one member's ``nn.Conv2d`` (its shape and settings; values are set by
            the stacking code).
        members: K.

    Shape:
        Input ``(B, K*C_in, H, W)``; output ``(B, K*C_out, H', W')``.
    """

    def __init__(self, conv: nn.Conv2d, members: int) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"BatchedConv2d supports zero padding only, not {conv.padding_mode!r}")
        self.members = members
        self.in_channels = conv.in_channels * members
        self.out_channels = conv.out_channels * members
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups * members
        self.weight = nn.Parameter(torch.empty(self.out_channels, *conv.weight.shape[1:]))
        self.bias: nn.Parameter | None
        if conv.bias is not None:
            self.bias = nn.Parameter(torch.empty(self.out_channels))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, {self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"groups={self.groups}, bias={self.bias is not None}"
        )


def rows_to_channels(x: Tensor) -> Tensor:
    """``(K, B, F)`` -> ``(B, K*F)``: the rows of every member side by side, member
    ``k``'s features the block ``[k*F, (k+1)*F)`` (one copy)."""
    members, batch, features = x.shape
    return x.transpose(0, 1).reshape(batch, members * features)


def channels_to_rows(x: Tensor, members: int) -> Tensor:
    """``(B, K*F, *)`` -> ``(K, B, F*prod(*))``: each member's values per example, as
    rows (a view: the next :class:`BatchedLinear` makes it contiguous)."""
    batch = x.shape[0]
    return x.reshape(batch, members, -1).transpose(0, 1)
