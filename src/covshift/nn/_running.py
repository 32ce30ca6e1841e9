"""Running-statistics bookkeeping shared by the BatchNorm variants (renorm, ghost).

torch.nn's convention, which the variants keep so that a BatchNorm state_dict loads
into them: ``running = (1 - m) * running + m * batch`` with the *unbiased* batch
variance ``var * M / (M - 1)`` in ``running_var``; ``momentum=None`` means the
cumulative average ``m = 1 / num_batches_tracked`` (counted after the increment).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def track_batch(module: nn.Module, mean: Tensor, var: Tensor, count: int) -> None:
    """Count one batch in ``module.num_batches_tracked`` and fold its statistics in.

    Args:
        module: a BatchNorm-like module with ``momentum``, ``running_mean``,
            ``running_var`` and ``num_batches_tracked``.
        mean, var: ``(C,)`` batch mean and *biased* variance.
        count: M, the number of values each statistic was taken over.
    """
    module.num_batches_tracked.add_(1)
    if module.momentum is None:  # cumulative moving average
        factor = 1.0 / float(module.num_batches_tracked)
    else:
        factor = float(module.momentum)
    unbiased = var * (count / max(count - 1, 1))
    module.running_mean.lerp_(mean.to(module.running_mean.dtype), factor)
    module.running_var.lerp_(unbiased.to(module.running_var.dtype), factor)
