"""torch.nn's normalization layers with covshift's forward (:mod:`.functional`), as their
subclasses: torch's constructor (after covshift's argument checks), parameters, buffers,
``state_dict`` and ``extra_repr``. docs/nn.md says what ``isinstance`` now reaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from covshift.nn import checks
from covshift.nn import functional as F
from covshift.nn._base import BatchNormForward, TorchNormArgs, TorchSignature

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


_BN_DOC = """Batch Normalization (Ioffe & Szegedy 2015, arXiv 1502.03167) of {shape}.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * γ + β``, statistics per channel over all
    dims but C: ``torch.nn.{name}`` (its arguments, state and running-statistics rule)
    with covshift's forward. Example: ``{name}(16)(torch.randn({example}))``.
    """


class BatchNorm1d(BatchNormForward, nn.BatchNorm1d):
    __doc__ = _BN_DOC.format(shape="(N, C) or (N, C, L)", name="BatchNorm1d", example="8, 16, 10")


class BatchNorm2d(BatchNormForward, nn.BatchNorm2d):
    __doc__ = _BN_DOC.format(shape="(N, C, H, W)", name="BatchNorm2d", example="8, 16, 5, 5")


class BatchNorm3d(BatchNormForward, nn.BatchNorm3d):
    __doc__ = _BN_DOC.format(shape="(N, C, D, H, W)", name="BatchNorm3d", example="4, 16, 3, 5, 5")


class _InstanceNorm(TorchNormArgs):
    """covshift's forward (and constructor checks) for torch.nn's InstanceNorm classes."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        # torch's forward checks the channels and unsqueezes an unbatched input first.
        m: Any = self
        use_input_stats = m.training or not m.track_running_stats
        momentum = m.momentum if m.momentum is not None else 0.0
        state = (m.running_mean, m.running_var, m.weight, m.bias)
        return F.instance_norm(input, *state, use_input_stats, momentum, m.eps)


_IN_DOC = """Instance Normalization (Ulyanov et al. 2016, arXiv 1607.08022) of {shape}.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * γ + β``, statistics per sample and channel
    over the spatial dims: ``torch.nn.{name}`` (its arguments and state; unbatched input
    too) with covshift's forward. Example: ``{name}(16)(torch.randn({example}))``.
    """


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _IN_DOC.format(shape="(N, C, L)", name="InstanceNorm1d", example="8, 16, 10")


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _IN_DOC.format(shape="(N, C, H, W)", name="InstanceNorm2d", example="8, 16, 5, 5")


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _IN_DOC.format(
        shape="(N, C, D, H, W)", name="InstanceNorm3d", example="4, 16, 3, 5, 5"
    )


class LayerNorm(TorchSignature, nn.LayerNorm):
    """Layer Normalization (Ba, Kiros & Hinton 2016, arXiv 1607.06450).

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * γ + β``, statistics per sample over the
    trailing ``normalized_shape``, ``γ``, ``β`` element-wise: ``torch.nn.LayerNorm``
    with covshift's forward. Example: ``LayerNorm(768)(torch.randn(4, 10, 768))``.
    """

    def __init__(
        self, normalized_shape: int | Sequence[int], eps: float = 1e-5, *args: Any, **kwargs: Any
    ) -> None:
        shape = checks.normalized_shape(normalized_shape)
        super().__init__(shape, checks.eps_arg(eps), *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(TorchSignature, nn.GroupNorm):
    """Group Normalization (Wu & He 2018, arXiv 1803.08494).

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * γ + β``, statistics per sample and group of
    ``C / num_groups`` channels (and the spatial dims), ``γ``, ``β`` per channel:
    ``torch.nn.GroupNorm`` with covshift's forward (§5). Example: ``GroupNorm(4, 16)(x)``.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, *args: Any, **kwargs: Any
    ) -> None:
        groups = checks.positive_int(num_groups, "num_groups")
        channels = checks.positive_int(num_channels, "num_channels")
        super().__init__(groups, channels, checks.eps_arg(eps), *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise RuntimeError(
                f"Expected input with {self.num_channels} channels at dim 1 (num_channels), "
                f"but got input of shape {list(input.shape)}"
            )
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(TorchSignature, nn.RMSNorm):
    """Root-mean-square normalization (Zhang & Sennrich 2019, arXiv 1910.07467).

    ``y = x / sqrt(E[x²] + eps) * γ`` over the trailing ``normalized_shape``:
    ``torch.nn.RMSNorm`` with covshift's forward; ``eps=None`` is the machine epsilon
    of the compute dtype (float32's for half inputs), as torch's.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        shape = checks.normalized_shape(normalized_shape)
        super().__init__(shape, None if eps is None else checks.eps_arg(eps), *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
