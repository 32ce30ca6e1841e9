"""The shared skeleton of the norm layers, as torch.nn's: affine parameters, running
buffers, their reset, old-checkpoint loading, and BatchNorm's and InstanceNorm's
forward (which modes use which statistics).

The math those forwards reach is :mod:`covshift.nn.reference` (through
:mod:`covshift.nn.functional`); the concrete classes, with their docstrings, are in
:mod:`covshift.nn.layers`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from covshift.nn import checks
from covshift.nn import functional as F

__all__ = ["BatchNormBase", "InstanceNormBase", "NormBase", "register_affine", "reset_affine"]


def register_affine(
    module: nn.Module,
    shape: int | tuple[int, ...],
    affine: bool,
    bias: bool | None,
    factory: dict[str, Any],
) -> None:
    """Give ``module`` its ``weight`` (and ``bias``) parameters of ``shape``, or None
    for each without ``affine``; ``bias=None`` means the layer has no bias at all
    (RMSNorm), False a bias of None. Values are set by :func:`reset_affine`."""
    if affine:
        module.weight = nn.Parameter(torch.empty(shape, **factory))
    else:
        module.register_parameter("weight", None)
    if bias is None:
        return
    if affine and bias:
        module.bias = nn.Parameter(torch.empty(shape, **factory))
    else:
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    """Weight 1, bias 0: the identity affine."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class NormBase(nn.Module):
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
        self.num_features = checks.positive_int(num_features, "num_features")
        self.eps = checks.eps_arg(eps)
        self.momentum = checks.momentum_arg(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, num_features, affine, bias, factory)
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
        reset_affine(self)

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


class BatchNormBase(NormBase):
    """BatchNorm's forward, shared by BatchNorm1d/2d/3d, SyncBatchNorm and the variants."""

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


class InstanceNormBase(NormBase):
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
