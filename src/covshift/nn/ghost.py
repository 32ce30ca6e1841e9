"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, arXiv 1705.08741).

BatchNorm over the virtual batches ``x.split(virtual_batch_size)``, their running
statistics those of a BatchNorm fed them one by one; all full chunks in one call of the
core over the ``(k, virtual_batch_size, C, *)`` view (docs/derivations.md §14).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from covshift.nn import checks, registry
from covshift.nn import functional as F
from covshift.nn._base import BatchNormVariant
from covshift.nn.running import track_batch

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(BatchNormVariant):
    """BatchNorm over the (k, v, C, *) view in training (§14), tracked per virtual batch."""

    _doc_template = """Ghost Batch Normalization of {shape} inputs (Hoffer et al. 2017).

    BatchNorm with statistics over virtual batches of ``virtual_batch_size`` samples
    (``x.split``; the last may be shorter), one shared affine, running statistics
    updated once per virtual batch, in order; eval as BatchNorm. Arguments, parameters
    and buffers are BatchNorm's, and ``virtual_batch_size`` (>= 1; default 128, the
    paper's). Raises ValueError for a virtual batch with one value per channel in
    training (N = 33 with virtual_batch_size = 32 on (N, C) input).
    Example: ``{name}(16, virtual_batch_size=4)``.
    """

    def __init__(self, *args: Any, virtual_batch_size: int = 128, **kwargs: Any) -> None:
        what = "samples per virtual batch"
        vbs = checks.positive_int(virtual_batch_size, "virtual_batch_size", what)
        super().__init__(*args, **kwargs)
        self.virtual_batch_size = vbs

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        n, vbs = x.shape[0], self.virtual_batch_size
        if n == 0 or (not self.training and self.track_running_stats):
            return super().forward(x)  # BatchNorm's eval, or nothing to split
        full, size, rest = (1, n, 0) if n <= vbs else (n // vbs, vbs, n % vbs)
        if x.numel():  # the values per channel of the smallest virtual batch
            smallest = min(size, rest or size) * (x.numel() // (n * x.shape[1]))
            checks.values_per_virtual_batch(tuple(x.shape), vbs, size, rest, smallest)
        y = self._normalize_chunks(x[: full * size], full, size)
        return torch.cat([y, self._normalize_chunks(x[full * size :], 1, rest)]) if rest else y

    def _normalize_chunks(self, x: Tensor, k: int, size: int) -> Tensor:
        """Normalize ``x`` (k * size, C, *) as k chunks of ``size``; track each chunk."""
        xv = x.view(k, size, *x.shape[1:])  # (k, size, C, *): splitting dim 0 is a view
        dims = (1, *range(3, xv.dim()))
        y, mean, var = F.normalize_with_stats(
            xv, dims, self.weight, self.bias, eps=self.eps, channel_dim=2
        )
        if self.training and self.track_running_stats:
            count = size * (x.numel() // max(x.shape[0] * x.shape[1], 1))
            assert mean is not None
            for i in range(k):  # (k, C): one BatchNorm step per virtual batch, in order
                track_batch(self, mean[i], var[i], count)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, dims=1): ...


class GhostBatchNorm2d(_GhostBatchNorm, dims=2): ...


class GhostBatchNorm3d(_GhostBatchNorm, dims=3): ...


registry.register_kind(
    registry.NormKind(
        "ghost_batch",
        {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d},
        batch_statistics=True,
    )
)
