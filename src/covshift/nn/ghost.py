"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, arXiv 1705.08741).

BatchNorm whose statistics are taken over *virtual* sub-batches: the batch of N
samples is cut, in order, into chunks of ``virtual_batch_size`` samples (the last
chunk holds the remainder when N is not a multiple), and each chunk is batch-
normalized on its own. Large-batch training then keeps the regularizing noise of
small-batch statistics ("train longer, generalize better", Section 4).

Numeric and bookkeeping choices:

- the chunks are ``x.split(virtual_batch_size)`` along dim 0: full chunks first, a
  shorter last one when N is not a multiple, one chunk (plain BatchNorm) when
  N <= virtual_batch_size;
- running statistics are updated once *per virtual batch*, in chunk order, each
  update counting as one step of ``num_batches_tracked`` (so ``momentum=None``
  averages over virtual batches). The layer's state after a batch is therefore
  exactly that of a BatchNorm fed the chunks one after another;
- in eval the running statistics normalize, as BatchNorm; with
  ``track_running_stats=False`` eval uses the virtual-batch statistics too.

All full chunks are normalized in one call of the shared core (the input viewed as
``(k, virtual_batch_size, C, *)``, statistics over dims 1 and the spatial ones), so
the cost is BatchNorm's, not k times a small BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from covshift.nn import checks, registry
from covshift.nn import functional as F
from covshift.nn._base import BatchNormVariant
from covshift.nn.running import track_batch

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(BatchNormVariant):
    """Ghost BN's forward on top of covshift's BatchNorm: the core's normalization over
    the (k, v, C, *) view (derivations §14), running statistics per virtual batch."""

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
        virtual_batch_size: int = 128,
        bias: bool = True,
    ) -> None:
        vbs = checks.positive_int(
            virtual_batch_size, "virtual_batch_size", "samples per virtual batch"
        )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.virtual_batch_size = vbs

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.track_running_stats:
            return super().forward(x)  # BatchNorm eval
        self._check_input_dim(x)
        n, vbs = x.shape[0], self.virtual_batch_size
        if n == 0:
            return super().forward(x)  # nothing to split
        full, size, rest = (1, n, 0) if n <= vbs else (n // vbs, vbs, n % vbs)
        spatial = x.numel() // (n * x.shape[1]) if x.numel() else 0  # per sample, channel
        if x.numel():
            smallest = min(size, rest or size) * spatial  # values per channel
            checks.values_per_virtual_batch(tuple(x.shape), vbs, size, rest, smallest)
        parts = [self._normalize_chunks(x[: full * size], full, size)]
        if rest:
            parts.append(self._normalize_chunks(x[full * size :], 1, rest))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

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


_DOC = """Ghost Batch Normalization over {input} (Hoffer et al. 2017, arXiv 1705.08741).

    BatchNorm with statistics over virtual batches of ``virtual_batch_size``
    samples: ``x.split(virtual_batch_size)`` (the last chunk may be shorter), each
    chunk normalized with its own mean and biased variance, one shared affine.
    Running statistics are updated once per virtual batch, in order (the state after
    a batch equals a BatchNorm fed the chunks one by one); eval uses them as
    BatchNorm does. Parameters and buffers are BatchNorm's.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias:
            as {base}.
        virtual_batch_size: samples per virtual batch, >= 1. Default 128 (the paper's).

    Shape:
        Input {shape}; output the same.

    Raises:
        ValueError: virtual_batch_size < 1; a virtual batch with one value per channel
            in training (e.g. N = 33 with virtual_batch_size = 32 on (N, C) input);
            the errors of {base}.

    Example:
        >>> m = {name}(16, virtual_batch_size=4)
        >>> y = m(torch.randn({example}))  # two virtual batches of 4
"""


class GhostBatchNorm1d(_GhostBatchNorm):
    __doc__ = _DOC.format(
        input="(N, C) or (N, C, L)",
        base="BatchNorm1d",
        shape="(N, C) or (N, C, L)",
        name="GhostBatchNorm1d",
        example="8, 16",
    )
    _ranks = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    __doc__ = _DOC.format(
        input="(N, C, H, W)",
        base="BatchNorm2d",
        shape="(N, C, H, W)",
        name="GhostBatchNorm2d",
        example="8, 16, 5, 5",
    )
    _ranks = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    __doc__ = _DOC.format(
        input="(N, C, D, H, W)",
        base="BatchNorm3d",
        shape="(N, C, D, H, W)",
        name="GhostBatchNorm3d",
        example="4, 16, 3, 5, 5",
    )
    _ranks = (5,)


registry.register_kind(
    registry.NormKind(
        "ghost_batch",
        {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d},
        {},
        batch_statistics=True,
    )
)
