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

__all__ = [
    "BatchedConv2d",
    "BatchedLinear",
    "MemberwiseActivation",
    "channels_to_rows",
    "rows_to_channels",
]

# Members' values are padded to a multiple of this many floats before a transcendental
# activation: twice the widest vector registers (AVX-512: 16 floats) that torch's
# element-wise loops unroll to.
_VECTOR_FLOATS = 64


class _MembersLinear(torch.autograd.Function):
    """``y_k = x_k W_k^T + b_k`` for every member, forward and backward as K Linears.

    Every matmul writes a contiguous result through its transpose (``y_k^T = W_k
    x_k^T``, ``dx_k^T = W_k^T dy_k^T``, ``dW_k^T = x_k^T dy_k``): a result that is not
    contiguous makes torch run the batched matmul member by member through the same
    BLAS call as a single Linear (on this result's transposed layout, the one a single
    Linear computes in), where a contiguous one would go to a batched-GEMM kernel that
    is slower here and rounds differently. So each member's output, input gradient and
    weight gradient are those of ``torch.nn.functional.linear`` and its autograd
    backward, bit for bit; ``db_k = sum_b dy_k`` sums each member's contiguous block as
    a single Linear sums its gradient (tests/batched/test_layers.py). The input gradient
    is computed only when asked for (not for the first layer).
    """

    # ctx in forward, not a separate setup_context: with one, torch binds the call's
    # arguments through inspect.signature at every apply (7% of a batched MLP run).
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        members, batch, _ = x.shape
        out = x.new_empty(members, batch, weight.shape[1])
        if bias is None:
            torch.bmm(weight, x.transpose(1, 2), out=out.transpose(1, 2))
        else:
            torch.baddbmm(bias.unsqueeze(2), weight, x.transpose(1, 2), out=out.transpose(1, 2))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = x.new_empty(x.shape)
            torch.bmm(weight.transpose(1, 2), grad.transpose(1, 2), out=dx.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            dw = weight.new_empty(weight.shape)
            torch.bmm(x.transpose(1, 2), grad, out=dw.transpose(1, 2))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # Each member's rows reduced as a single Linear's (B, out) gradient is: a
            # contiguous block per member (a strided one sums in another order).
            db = grad.contiguous().sum(dim=1)
        return dx, dw, db


class BatchedLinear(nn.Module):
    """``K`` Linear layers, each on its own member's rows: ``y_k = x_k W_k^T + b_k``.

    Args:
        members: K.
        in_features, out_features: those of one member's Linear.
        bias: whether each member has a bias.

    Shape:
        Input ``(K, B, in_features)`` (any strides); output ``(K, B, out_features)``.

    One ``baddbmm`` (``bmm`` without bias) computes all members, one BLAS call each
    (:class:`_MembersLinear`): forward ``x_k W_k^T + b_k``, backward
    ``dW_k = dy_k^T x_k``, ``db_k = sum_b dy_k``, ``dx_k = dy_k W_k``; the matmuls of one
    member never read another's rows. The output is contiguous.
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
        return _MembersLinear.apply(x, self.weight, self.bias)

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


class MemberwiseActivation(nn.Module):
    """An element-wise activation (sigmoid, tanh) of fully connected members' rows
    ``(K, B, F)``, each member's ``B*F`` values padded to whole vector blocks.

    torch computes an element-wise function in vector blocks and the few values left
    at the end of the tensor one by one, and its vector and one-by-one ``exp`` may
    differ in the last bit. Which of a member's values are left over would then depend
    on how many members share the tensor; padded, none are, so a member's activations
    are the same bits in any batch (with one torch thread).
    """

    def __init__(self, act: nn.Module, members: int) -> None:
        super().__init__()
        self.act = act
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        count = x[0].numel()
        pad = (-count) % _VECTOR_FLOATS
        if pad == 0:
            return self.act(x)
        padded = F.pad(x.reshape(self.members, count), (0, pad))
        return self.act(padded)[:, :count].reshape(x.shape)


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
