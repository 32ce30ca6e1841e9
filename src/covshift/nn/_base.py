"""The constructor checks and BatchNorm forward the plain layers and the variants share,
and the base of the variants (the layers torch.nn has no class for), which subclass
:class:`NormVariant`, not a torch.nn class, so that no torch or timm helper finding
norms by ``isinstance`` turns them into plain BatchNorm (docs/nn.md: why, how to add one).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from covshift.nn import checks
from covshift.nn import functional as F

__all__ = ["BatchNormForward", "BatchNormVariant", "NormVariant", "TorchNormArgs", "TorchSignature"]


class TorchSignature:
    """A mixin before a torch.nn class for an ``__init__(self, checked, *args, own=1,
    **kwargs)``: ``inspect.signature`` shows torch's signature and the own keywords."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        torch_cls = next((k for k in cls.__mro__ if k.__module__.startswith("torch.")), None)
        if torch_cls is None:  # a mixin
            return
        own = inspect.signature(cls.__init__).parameters.values()
        params = [*inspect.signature(torch_cls).parameters.values()]
        params += [p for p in own if p.kind is p.KEYWORD_ONLY]
        cls.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]


class TorchNormArgs(TorchSignature):
    """torch's BatchNorm/InstanceNorm constructor after covshift's checks of
    ``num_features``, ``eps`` and ``momentum``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        checked = checks.norm_args(num_features, eps, momentum)
        super().__init__(*checked, *args, **kwargs)  # type: ignore[call-arg]


class BatchNormForward(TorchNormArgs):
    """covshift's forward for a class with torch's BatchNorm state (a mixin before
    torch.nn's BatchNorm classes, or torch's ``_NormBase``)."""

    def forward(self, input: Tensor) -> Tensor:
        # As torch.nn: batch statistics in training, and in eval when there are no
        # running buffers; the buffers are passed (so updated) only when tracking.
        m: Any = self
        m._check_input_dim(input)
        pass_buffers = not m.training or m.track_running_stats
        running = (m.running_mean, m.running_var) if pass_buffers else (None, None)
        training = m.training or (m.running_mean is None and m.running_var is None)
        counter = m.num_batches_tracked if m.training and m.track_running_stats else None
        return F.batch_norm(input, *running, m.weight, m.bias, training, m.momentum, m.eps, counter)


class NormVariant(nn.Module):
    """Base of a normalization layer torch.nn has no class for (see the module doc)."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def register_affine(
        self, shape: int | tuple[int, ...], affine: bool, bias: bool | None, factory: dict
    ) -> None:
        """``weight`` (and ``bias``; ``bias=None``: no bias attribute) of ``shape``, None
        without ``affine``, set by :meth:`reset_parameters`."""
        weight = nn.Parameter(torch.empty(shape, **factory)) if affine else None
        self.register_parameter("weight", weight)
        if bias is not None:
            own = nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None
            self.register_parameter("bias", own)

    def reset_parameters(self) -> None:
        """Weight 1, bias 0: the identity affine."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)


class BatchNormVariant(BatchNormForward, _NormBase, NormVariant):  # type: ignore[misc]
    """BatchNorm's arguments, state, ``repr`` (torch's ``_NormBase``, which no helper
    looks for) and forward; ``class GhostBatchNorm2d(_GhostBatchNorm, dims=2)`` gives a
    public class its input rank and ``_doc_template`` filled in as its docstring."""

    _ranks: tuple[int, ...] = ()
    _doc_template = ""

    def __init_subclass__(cls, dims: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if dims is not None:
            cls._ranks = {1: (2, 3), 2: (4,), 3: (5,)}[dims]
            shape = {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[dims]
            cls.__doc__ = cls._doc_template.format(shape=shape, name=cls.__name__)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            ranks = " or ".join(f"{n}D" for n in self._ranks)
            raise ValueError(f"expected {ranks} input (got {input.dim()}D input)")
