"""Drop-in replacements for torch.nn's normalization layers, built on one core.

Every layer calls :mod:`covshift.nn.functional`, whose statistics run over reduction
axes with a hand-derived backward. Constructor arguments, defaults, parameter and
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

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from covshift.nn import functional as F

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


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite float (such as 1e-5), got {eps!r}")
    if eps <= 0:
        raise ValueError(
            f"eps must be > 0 (it keeps 1/sqrt(var + eps) finite when a channel is "
            f"constant), got {eps!r}; use a small positive value such as 1e-5"
        )
    return float(eps)


def _check_momentum(momentum: float | None) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise ValueError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (running = (1 - momentum) * running + momentum * "
            f"batch), or None for a cumulative average; got {momentum!r}"
        )
    return float(momentum)


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class _NormBase(nn.Module):
    """Parameters and running buffers shared by BatchNorm and InstanceNorm (as torch.nn's)."""

    # Version 2 added num_batches_tracked (torch.nn's numbering, so old checkpoints load).
    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = _check_positive_int(num_features, "num_features")
        self.eps = _check_eps(eps)
        self.momentum = _check_momentum(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, step counter 0."""
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; weight 1 and bias 0 (the identity affine)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints from before num_batches_tracked existed (torch < 0.4.1) lack it:
        # keep the layer's own count (as torch.nn does) rather than fail a strict load.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats:
            current = self.num_batches_tracked
            keep = current is not None and current.device.type != "meta"
            state_dict.setdefault(key, current if keep else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _BatchNorm(_NormBase):
    _spatial: tuple[int, ...] = ()  # accepted input ranks

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._spatial:
            ranks = " or ".join(f"{n}D" for n in self._spatial)
            raise ValueError(f"expected {ranks} input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        # As torch.nn: batch statistics in training, and in eval when there are no
        # running buffers; the buffers are passed (so updated) only when tracking.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        counting = self.training and self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            training=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if counting else None,
        )


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


class BatchNorm1d(_BatchNorm):
    __doc__ = _BN_DOC.format(
        input="a 2D or 3D input",
        spatial=" (and the length L)",
        shape="(N, C) or (N, C, L)",
        rank="a non-2D/3D",
        name="BatchNorm1d",
        example="8, 16, 10",
    )
    _spatial = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = _BN_DOC.format(
        input="a 4D input",
        spatial=" and the spatial dims (H, W)",
        shape="(N, C, H, W)",
        rank="a non-4D",
        name="BatchNorm2d",
        example="8, 16, 5, 5",
    )
    _spatial = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = _BN_DOC.format(
        input="a 5D input",
        spatial=" and the spatial dims (D, H, W)",
        shape="(N, C, D, H, W)",
        rank="a non-5D",
        name="BatchNorm3d",
        example="4, 16, 3, 5, 5",
    )
    _spatial = (5,)


class _InstanceNorm(_NormBase):
    _batched_rank: int = 0  # the rank of a batched input; one less is an unbatched one

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints from torch < 0.4 carry running stats that InstanceNorm no longer
        # tracks by default: report them (as torch.nn does) instead of loading them.
        if local_metadata.get("version") is None and not self.track_running_stats:
            keys = [prefix + n for n in ("running_mean", "running_var") if prefix + n in state_dict]
            if keys:
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {keys} for {type(self).__name__} "
                    "with track_running_stats=False; remove them from the state_dict, or "
                    "build the layer with track_running_stats=True to use them."
                )
                for k in keys:
                    state_dict.pop(k)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        rank = self._batched_rank
        if x.dim() not in (rank - 1, rank):
            raise ValueError(f"expected {rank - 1}D or {rank}D input (got {x.dim()}D input)")
        feature_dim = x.dim() - (rank - 1)
        if x.shape[feature_dim] != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {x.shape[feature_dim]}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        if x.dim() == rank - 1:
            return self._normalize(x.unsqueeze(0)).squeeze(0)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        use_input_stats = self.training or not self.track_running_stats
        return F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats=use_input_stats,
            momentum=self.momentum if self.momentum is not None else 0.0,
            eps=self.eps,
        )


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


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _IN_DOC.format(
        input="a 3D input", shape="(N, C, L) or (C, L)", name="InstanceNorm1d", example="8, 16, 10"
    )
    _batched_rank = 3


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _IN_DOC.format(
        input="a 4D input",
        shape="(N, C, H, W) or (C, H, W)",
        name="InstanceNorm2d",
        example="8, 16, 5, 5",
    )
    _batched_rank = 4


class InstanceNorm3d(_InstanceNorm):
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
        self.eps = _check_eps(eps)
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

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
        _check_positive_int(num_groups, "num_groups")
        _check_positive_int(num_channels, "num_channels")
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = _check_eps(eps)
        self.affine = affine
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

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
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = None if eps is None else _check_eps(eps)
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        if elementwise_affine:
            self.weight = nn.Parameter(
                torch.empty(self.normalized_shape, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
