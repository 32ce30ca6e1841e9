"""Drop-in replacements for torch.nn's normalization layers, built on one core.

Every layer calls :mod:`covshift.nn.functional`; what it computes, forward and
closed-form backward, is :mod:`covshift.nn.reference` over the layer's layout
(docs/derivations.md says why, section by section). The shared skeleton (affine
parameters, running buffers, BatchNorm's and InstanceNorm's forward) is
:mod:`covshift.nn._base`. Constructor arguments, defaults, parameter and
buffer names, running-statistics semantics and error types follow torch.nn, so a
torch.nn state_dict loads into these layers and back.

Numeric choices, shared by all layers: statistics in float32 at least (float16 and
bfloat16 inputs are upcast; the output keeps the input dtype); the biased variance
normalizes; the running variance stores the unbiased one; eps goes inside the square
root: ``(x - μ) / sqrt(σ² + eps)``.

One deliberate difference: every layer checks ``eps > 0`` (and BatchNorm/InstanceNorm
``0 <= momentum <= 1``) when it is built and raises ValueError, where torch checks
eps only for BatchNorm, only at forward time, and not at all for the others.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from covshift.nn import checks
from covshift.nn import functional as F
from covshift.nn._base import (
    BatchNormBase,
    InstanceNormBase,
    register_affine,
    reset_affine,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
]


_BN_DOC = """Batch Normalization over {input} (Ioffe & Szegedy 2015, arXiv 1502.03167).

    .. math:: y = \\frac{{x - E[x]}}{{\\sqrt{{Var[x] + \\epsilon}}}} \\cdot \\gamma + \\beta

    Mean and biased variance per channel over the batch{spatial}. In training the
    running statistics follow ``running = (1 - momentum) * running + momentum * batch``
    (the unbiased batch variance goes into ``running_var``); ``momentum=None`` makes
    it a cumulative average over ``num_batches_tracked`` steps. In eval the running
    statistics normalize (batch statistics if ``track_running_stats=False``).
    Statistics are float32 at least, for half-precision inputs too.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance, > 0. Default 1e-5.
        momentum: running-statistics factor in [0, 1], or None. Default 0.1.
        affine: learn a per-channel weight (init 1) and bias (init 0). Default True.
        track_running_stats: keep running_mean/running_var. Default True.
        device, dtype: of the parameters and buffers.
        bias: with ``affine``, learn the bias too. Default True.

    Shape:
        - Input: {shape}
        - Output: same shape (and memory format) as the input.

    Raises:
        ValueError: {rank} input; training with one value per channel.
        RuntimeError: an input whose channel count is not ``num_features``.

    Example:
        >>> m = {name}(16)
        >>> y = m(torch.randn({example}))
    """


class BatchNorm1d(BatchNormBase):
    __doc__ = _BN_DOC.format(
        input="a 2D or 3D input",
        spatial=" (and the length L)",
        shape="(N, C) or (N, C, L)",
        rank="a non-2D/3D",
        name="BatchNorm1d",
        example="8, 16, 10",
    )
    _spatial = (2, 3)


class BatchNorm2d(BatchNormBase):
    __doc__ = _BN_DOC.format(
        input="a 4D input",
        spatial=" and the spatial dims (H, W)",
        shape="(N, C, H, W)",
        rank="a non-4D",
        name="BatchNorm2d",
        example="8, 16, 5, 5",
    )
    _spatial = (4,)


class BatchNorm3d(BatchNormBase):
    __doc__ = _BN_DOC.format(
        input="a 5D input",
        spatial=" and the spatial dims (D, H, W)",
        shape="(N, C, D, H, W)",
        rank="a non-5D",
        name="BatchNorm3d",
        example="4, 16, 3, 5, 5",
    )
    _spatial = (5,)


_IN_DOC = """Instance Normalization over {input} (Ulyanov et al. 2016, arXiv 1607.08022).

    .. math:: y = \\frac{{x - E[x]}}{{\\sqrt{{Var[x] + \\epsilon}}}} \\cdot \\gamma + \\beta

    Mean and biased variance per sample and channel, over the spatial dims; the
    same at train and test time unless ``track_running_stats=True``, which keeps
    running averages of the per-instance statistics (the batch mean of them, with
    the unbiased variance) and uses them in eval, as torch.nn does.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance, > 0. Default 1e-5.
        momentum: running-statistics factor in [0, 1]; None means no update. Default 0.1.
        affine: learn a per-channel weight and bias. Default False.
        track_running_stats: keep running statistics. Default False.
        device, dtype: of the parameters and buffers.
        bias: with ``affine``, learn the bias too. Default True.

    Shape:
        - Input: {shape} (unbatched inputs are accepted).
        - Output: same shape as the input.

    Raises:
        ValueError: wrong rank; one spatial element in training; with ``affine``, a
            channel count that is not ``num_features`` (a warning without affine).

    Example:
        >>> m = {name}(16, affine=True)
        >>> y = m(torch.randn({example}))
    """


class InstanceNorm1d(InstanceNormBase):
    __doc__ = _IN_DOC.format(
        input="a 3D input", shape="(N, C, L) or (C, L)", name="InstanceNorm1d", example="8, 16, 10"
    )
    _batched_rank = 3


class InstanceNorm2d(InstanceNormBase):
    __doc__ = _IN_DOC.format(
        input="a 4D input",
        shape="(N, C, H, W) or (C, H, W)",
        name="InstanceNorm2d",
        example="8, 16, 5, 5",
    )
    _batched_rank = 4


class InstanceNorm3d(InstanceNormBase):
    __doc__ = _IN_DOC.format(
        input="a 5D input",
        shape="(N, C, D, H, W) or (C, D, H, W)",
        name="InstanceNorm3d",
        example="4, 16, 3, 5, 5",
    )
    _batched_rank = 5


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        shape: tuple[int, ...] = (int(normalized_shape),)
    else:
        shape = tuple(int(n) for n in normalized_shape)
    if not shape or any(n < 1 for n in shape):
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty sequence of them, "
            f"got {normalized_shape!r}"
        )
    return shape


class LayerNorm(nn.Module):
    """Layer Normalization over the trailing dims (Ba, Kiros & Hinton 2016, arXiv 1607.06450).

    .. math:: y = \\frac{x - E[x]}{\\sqrt{Var[x] + \\epsilon}} \\cdot \\gamma + \\beta

    Mean and biased variance per sample over the last ``len(normalized_shape)``
    dims; ``γ``, ``β`` are element-wise, of shape ``normalized_shape``. Statistics in
    float32 at least. For images, LayerNorm over (C, H, W) with a per-channel affine
    is ``GroupNorm(1, C)``.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for one dim).
        eps: added to the variance, > 0. Default 1e-5.
        elementwise_affine: learn ``γ`` (init 1) and ``β`` (init 0). Default True.
        bias: with ``elementwise_affine``, learn ``β`` too. Default True.
        device, dtype: of the parameters.

    Shape:
        - Input: ``(*, *normalized_shape)``. Output: the same.

    Raises:
        RuntimeError: an input whose trailing dims are not ``normalized_shape``.

    Example:
        >>> m = LayerNorm(768)
        >>> y = m(torch.randn(4, 10, 768))
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = checks.eps_arg(eps)
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        register_affine(self, self.normalized_shape, elementwise_affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        reset_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class GroupNorm(nn.Module):
    """Group Normalization (Wu & He 2018, arXiv 1803.08494).

    .. math:: y = \\frac{x - E[x]}{\\sqrt{Var[x] + \\epsilon}} \\cdot \\gamma + \\beta

    The C channels fall into ``num_groups`` groups of ``C / num_groups``; mean and
    biased variance per sample and group, over the group's channels and the spatial
    dims; ``γ``, ``β`` per channel. Independent of the batch size. ``GroupNorm(1, C)``
    is LayerNorm over (C, *) with a per-channel affine; ``GroupNorm(C, C)`` is
    InstanceNorm with affine. Statistics in float32 at least.

    Args:
        num_groups: G, which must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance, > 0. Default 1e-5.
        affine: learn per-channel ``γ`` (init 1) and ``β`` (init 0). Default True.
        device, dtype: of the parameters.
        bias: with ``affine``, learn ``β`` too. Default True.

    Shape:
        - Input: ``(N, C, *)``. Output: the same (memory format kept).

    Raises:
        ValueError: ``num_groups`` that does not divide ``num_channels``; one value
            per group in training.
        RuntimeError: an input whose channel count is not ``num_channels``.

    Example:
        >>> m = GroupNorm(4, 16)
        >>> y = m(torch.randn(2, 16, 8, 8))

    The math that runs: :func:`covshift.nn.functional.group_norm` ->
    :func:`covshift.nn.layout.group_norm_layout` (the (N, G, C/G, *) view) ->
    :func:`covshift.nn.reference.forward` / :func:`~covshift.nn.reference.backward`
    (their per-channel branch, (5.1)-(5.5)), whichever path runs
    (:mod:`covshift.nn.backend`). Derivation: docs/derivations.md §1, §3, §5. Tests:
    tests/nn/test_layers.py (``test_groupnorm_*``, against torch.nn),
    tests/nn/test_autograd.py (gradcheck, double backward), tests/nn/test_native.py.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        checks.positive_int(num_groups, "num_groups")
        checks.positive_int(num_channels, "num_channels")
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = checks.eps_arg(eps)
        self.affine = affine
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        register_affine(self, num_channels, affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        reset_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise RuntimeError(
                f"Expected input with {self.num_channels} channels at dim 1 (num_channels), "
                f"but got input of shape {list(x.shape)}"
            )
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
            f"affine={self.affine}, bias={self.bias is not None}"
        )


class RMSNorm(nn.Module):
    """Root-mean-square normalization (Zhang & Sennrich 2019, arXiv 1910.07467).

    .. math:: y = \\frac{x}{\\sqrt{E[x^2] + \\epsilon}} \\cdot \\gamma

    No mean subtraction and no bias: the mean of squares over the trailing
    ``normalized_shape`` rescales each sample. ``eps=None`` means
    ``torch.finfo(compute dtype).eps``, the compute dtype being float32 for
    float16/bfloat16 inputs (as torch.nn.RMSNorm).

    Args:
        normalized_shape: the trailing shape to normalize over (an int for one dim).
        eps: added to the mean square, > 0, or None. Default None.
        elementwise_affine: learn ``γ`` (init 1). Default True.
        device, dtype: of the parameter.

    Shape:
        - Input: ``(*, *normalized_shape)``. Output: the same.

    Raises:
        RuntimeError: an input whose trailing dims are not ``normalized_shape``.

    Example:
        >>> m = RMSNorm(768)
        >>> y = m(torch.randn(4, 10, 768))
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = None if eps is None else checks.eps_arg(eps)
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        register_affine(self, self.normalized_shape, elementwise_affine, None, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1."""
        reset_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
