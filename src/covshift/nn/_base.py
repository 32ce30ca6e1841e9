"""The base of covshift's variants, the layers torch.nn has no class for, and
BatchNorm's forward, which the plain BatchNorms share with the BatchNorm variants.

covshift's plain layers (:mod:`.layers`) subclass torch.nn's. The variants (Batch
Renorm, Ghost BN, and any new layer such as Dynamic Tanh) subclass
:class:`NormVariant` instead, *not* a torch.nn norm class, on purpose: torch's and
timm's helpers find norm layers by ``isinstance`` and rebuild them as their own
(``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` makes every ``_BatchNorm`` a plain
``SyncBatchNorm``; timm's ``freeze_batch_norm_2d`` makes every ``BatchNorm2d`` a
``FrozenBatchNorm2d``), which would turn a Batch Renorm (r, d clipping) or a Ghost BN
(statistics per virtual batch) into plain BatchNorm without a word. covshift's own
tools (:func:`covshift.nn.convert`, :func:`~covshift.nn.fold_batchnorm`,
:func:`~covshift.nn.freeze_batchnorm`, :class:`~covshift.nn.SyncBatchNorm`) know the
variants through the registry of kinds (:mod:`.registry`).

A variant states its parameters with :meth:`NormVariant.register_affine` (torch's
names: ``weight``, ``bias``), its registry kind with
:func:`covshift.nn.registry.register_kind`, and writes ``__init__``, ``forward`` and
``extra_repr`` (docs/nn.md, "Adding a layer"). :class:`BatchNormVariant` adds
BatchNorm's running buffers, constructor arguments, forward and ``state_dict``, so a
torch BatchNorm's ``state_dict`` loads into a BatchNorm variant and back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from covshift.nn import checks
from covshift.nn import functional as F

__all__ = ["BatchNormVariant", "NormVariant", "batch_norm_forward"]


def batch_norm_forward(m: Any, x: Tensor) -> Tensor:
    """BatchNorm's forward for ``m`` (torch's BatchNorm state: ``running_mean``, ...).

    As torch.nn: batch statistics in training, and in eval when there are no running
    buffers; the buffers are passed (so updated) only when tracking.
    """
    use_batch_stats = m.training or (m.running_mean is None and m.running_var is None)
    pass_buffers = not m.training or m.track_running_stats
    counting = m.training and m.track_running_stats
    return F.batch_norm(
        x,
        m.running_mean if pass_buffers else None,
        m.running_var if pass_buffers else None,
        m.weight,
        m.bias,
        training=use_batch_stats,
        momentum=m.momentum,
        eps=m.eps,
        num_batches_tracked=m.num_batches_tracked if counting else None,
    )


class NormVariant(nn.Module):
    """Base of a normalization layer torch.nn has no class for (see the module doc)."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def register_affine(
        self,
        shape: int | tuple[int, ...],
        affine: bool,
        bias: bool | None,
        factory: dict[str, Any],
    ) -> None:
        """``weight`` (and ``bias``) parameters of ``shape``, or None for each without
        ``affine``; ``bias=None`` means the layer has no bias at all, False a bias of
        None. Their values are set by :meth:`reset_parameters`."""
        weight = nn.Parameter(torch.empty(shape, **factory)) if affine else None
        self.register_parameter("weight", weight)
        if bias is not None:
            has_bias = affine and bias
            self.register_parameter(
                "bias", nn.Parameter(torch.empty(shape, **factory)) if has_bias else None
            )

    def reset_parameters(self) -> None:
        """Weight 1, bias 0: the identity affine."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)


class BatchNormVariant(NormVariant):
    """BatchNorm's state and forward, with torch.nn's arguments, names and defaults.

    Subclasses set ``_ranks``, the input ranks they accept (``(2, 3)`` for 1d), and
    override ``forward`` where they differ from BatchNorm (calling
    ``super().forward`` for what they share, eval mode usually).
    """

    _ranks: tuple[int, ...] = ()
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
        self.num_features, self.eps, self.momentum = checks.norm_args(num_features, eps, momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.register_affine(self.num_features, affine, bias, factory)
        tracked = {
            "running_mean": torch.zeros(self.num_features, **factory),
            "running_var": torch.ones(self.num_features, **factory),
            "num_batches_tracked": torch.tensor(0, dtype=torch.long, device=device),
        }
        for name, value in tracked.items():
            self.register_buffer(name, value if track_running_stats else None)
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
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
        super().reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._ranks:
            ranks = " or ".join(f"{n}D" for n in self._ranks)
            raise ValueError(f"expected {ranks} input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        return batch_norm_forward(self, x)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        *args: Any,
    ) -> None:
        # Checkpoints from before num_batches_tracked existed (torch < 0.4.1) lack it:
        # keep the layer's own count (as torch.nn does) rather than fail a strict load.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats:
            current = self.num_batches_tracked
            keep = current is not None and current.device.type != "meta"
            state_dict.setdefault(key, current if keep else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
