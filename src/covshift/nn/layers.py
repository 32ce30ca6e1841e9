"""torch.nn's normalization layers with covshift's forward, as their subclasses.

``covshift.nn.BatchNorm2d`` *is* a ``torch.nn.BatchNorm2d`` (``isinstance`` holds, so
torch's and timm's helpers and Hugging Face's init code treat it as one): torch's
constructor, parameters, buffers, ``state_dict``, ``reset_parameters`` and
``extra_repr``, and covshift's ``forward``, which calls :mod:`covshift.nn.functional`:
what it computes, forward and closed-form backward, is :mod:`covshift.nn.reference`
over the layer's layout (docs/derivations.md says why, section by section), on the
native node or the reference Function (:mod:`covshift.nn.backend`).

Numeric choices, shared by all layers: statistics in float32 at least (float16 and
bfloat16 inputs are upcast; the output keeps the input dtype); the biased variance
normalizes; the running variance stores the unbiased one; eps goes inside the square
root: ``(x - μ) / sqrt(σ² + eps)``.

What covshift adds to torch's constructors: every layer checks ``eps > 0`` (and
BatchNorm/InstanceNorm ``0 <= momentum <= 1``, the sizes positive ints) when it is
built and raises ValueError, where torch checks eps only for BatchNorm, only at
forward time, and not at all for the others.

The variants torch.nn has no class for (Batch Renorm, Ghost BN, ...) are *not*
subclasses of torch's classes: :mod:`covshift.nn._base` says why.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from covshift.nn import checks
from covshift.nn import functional as F
from covshift.nn._base import batch_norm_forward

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

Device = torch.device | str | None


class _BatchNorm:
    """covshift's forward (and constructor checks) for torch.nn's BatchNorm classes."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        num_features, eps, momentum = checks.norm_args(num_features, eps, momentum)
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)  # type: ignore[attr-defined]
        return batch_norm_forward(self, input)  # type: ignore[arg-type]


_BN_DOC = """Batch Normalization over {input} (Ioffe & Szegedy 2015, arXiv 1502.03167).

    .. math:: y = \\frac{{x - E[x]}}{{\\sqrt{{Var[x] + \\epsilon}}}} \\cdot \\gamma + \\beta

    ``torch.nn.{name}`` (same arguments, state and running-statistics rule,
    ``momentum=None`` a cumulative average) with covshift's forward: statistics per
    channel over the batch{spatial}, float32 at least.

    Shape: input {shape}; output the same (and in the same memory format).

    Example:
        >>> m = {name}(16)
        >>> y = m(torch.randn({example}))
    """


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    __doc__ = _BN_DOC.format(
        input="(N, C) or (N, C, L)",
        spatial=" (and L)",
        shape="(N, C) or (N, C, L)",
        name="BatchNorm1d",
        example="8, 16, 10",
    )


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    __doc__ = _BN_DOC.format(
        input="(N, C, H, W)",
        spatial=" and (H, W)",
        shape="(N, C, H, W)",
        name="BatchNorm2d",
        example="8, 16, 5, 5",
    )


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    __doc__ = _BN_DOC.format(
        input="(N, C, D, H, W)",
        spatial=" and (D, H, W)",
        shape="(N, C, D, H, W)",
        name="BatchNorm3d",
        example="4, 16, 3, 5, 5",
    )


class _InstanceNorm:
    """covshift's forward (and constructor checks) for torch.nn's InstanceNorm classes."""

    _batched_rank: int = 0  # the rank of a batched input; one less is an unbatched one

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        num_features, eps, momentum = checks.norm_args(num_features, eps, momentum)
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )

    def forward(self, input: Tensor) -> Tensor:
        m: Any = self
        m._check_input_dim(input)
        unbatched = input.dim() == self._batched_rank - 1
        feature_dim = 0 if unbatched else 1
        if input.shape[feature_dim] != m.num_features:  # torch's messages
            if m.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({m.num_features}), but got: {input.shape[feature_dim]}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        y = F.instance_norm(
            input.unsqueeze(0) if unbatched else input,
            m.running_mean,
            m.running_var,
            m.weight,
            m.bias,
            use_input_stats=m.training or not m.track_running_stats,
            momentum=m.momentum if m.momentum is not None else 0.0,
            eps=m.eps,
        )
        return y.squeeze(0) if unbatched else y


_IN_DOC = """Instance Normalization over {input} (Ulyanov et al. 2016, arXiv 1607.08022).

    .. math:: y = \\frac{{x - E[x]}}{{\\sqrt{{Var[x] + \\epsilon}}}} \\cdot \\gamma + \\beta

    ``torch.nn.{name}`` (same arguments and state; ``track_running_stats=True`` keeps
    the batch mean of the per-instance statistics for eval) with covshift's forward:
    statistics per sample and channel over the spatial dims, float32 at least.

    Shape: input {shape} (or unbatched, without N); output the same.

    Example:
        >>> m = {name}(16, affine=True)
        >>> y = m(torch.randn({example}))
    """


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _IN_DOC.format(
        input="(N, C, L)", shape="(N, C, L)", name="InstanceNorm1d", example="8, 16, 10"
    )
    _batched_rank = 3


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _IN_DOC.format(
        input="(N, C, H, W)", shape="(N, C, H, W)", name="InstanceNorm2d", example="8, 16, 5, 5"
    )
    _batched_rank = 4


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _IN_DOC.format(
        input="(N, C, D, H, W)",
        shape="(N, C, D, H, W)",
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


class LayerNorm(nn.LayerNorm):
    """Layer Normalization over the trailing dims (Ba, Kiros & Hinton 2016, arXiv 1607.06450).

    .. math:: y = \\frac{x - E[x]}{\\sqrt{Var[x] + \\epsilon}} \\cdot \\gamma + \\beta

    ``torch.nn.LayerNorm`` (same arguments and state; ``γ``, ``β`` element-wise, of
    shape ``normalized_shape``) with covshift's forward: statistics per sample over
    the last ``len(normalized_shape)`` dims, float32 at least. For images, LayerNorm
    over (C, H, W) with a per-channel affine is ``GroupNorm(1, C)``.

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
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = _as_shape(normalized_shape)
        super().__init__(shape, checks.eps_arg(eps), elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    """Group Normalization (Wu & He 2018, arXiv 1803.08494).

    .. math:: y = \\frac{x - E[x]}{\\sqrt{Var[x] + \\epsilon}} \\cdot \\gamma + \\beta

    ``torch.nn.GroupNorm`` (same arguments and state) with covshift's forward: the C
    channels fall into ``num_groups`` groups; mean and biased variance per sample and
    group, over the group's channels and the spatial dims, float32 at least; ``γ``,
    ``β`` per channel. ``GroupNorm(1, C)`` is LayerNorm over (C, *) with a per-channel
    affine; ``GroupNorm(C, C)`` is InstanceNorm with affine.

    The math that runs: :func:`covshift.nn.functional.group_norm` ->
    :func:`covshift.nn.layout.group_norm_layout` (the (N, G, C/G, *) view) ->
    :func:`covshift.nn.reference.forward` / :func:`~covshift.nn.reference.backward`
    (their per-channel branch, (5.1)-(5.5)), whichever path runs
    (:mod:`covshift.nn.backend`). Derivation: docs/derivations.md §1, §3, §5. Tests:
    tests/nn/test_layers.py (``test_groupnorm_*``, against torch.nn),
    tests/nn/test_autograd.py (gradcheck, double backward), tests/nn/test_native.py.

    Example:
        >>> m = GroupNorm(4, 16)
        >>> y = m(torch.randn(2, 16, 8, 8))
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        groups = checks.positive_int(num_groups, "num_groups")
        channels = checks.positive_int(num_channels, "num_channels")
        eps = checks.eps_arg(eps)
        super().__init__(groups, channels, eps, affine, device, dtype, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise RuntimeError(
                f"Expected input with {self.num_channels} channels at dim 1 (num_channels), "
                f"but got input of shape {list(input.shape)}"
            )
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """Root-mean-square normalization (Zhang & Sennrich 2019, arXiv 1910.07467).

    .. math:: y = \\frac{x}{\\sqrt{E[x^2] + \\epsilon}} \\cdot \\gamma

    ``torch.nn.RMSNorm`` (same arguments and state) with covshift's forward: no mean
    subtraction and no bias, the mean of squares over the trailing
    ``normalized_shape`` in float32 at least. ``eps=None`` means
    ``torch.finfo(compute dtype).eps``, float32's for float16/bfloat16 inputs.

    Example:
        >>> m = RMSNorm(768)
        >>> y = m(torch.randn(4, 10, 768))
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = _as_shape(normalized_shape)
        eps = None if eps is None else checks.eps_arg(eps)
        super().__init__(shape, eps, elementwise_affine, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
