"""The running-statistics rule of every layer, torch.nn's (derivations §7)::

    running_mean ← (1 - m) · running_mean + m · μ_B                      (7.1)
    running_var  ← (1 - m) · running_var  + m · σ²_B · M / (M - 1)       (7.2)

σ²_B the biased batch variance; ``momentum=None``: m_k = 1/k, k the step counter after
its increment (7.3). The native node applies the same rule in C++.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["RunningStats", "bessel", "step_factor", "track_batch", "update"]


class RunningStats(NamedTuple):
    """What a BatchNorm call in training updates, (7.1)-(7.3): the buffers (either may
    be None), the step counter (incremented first), m (None: ``1 / counter``), M/(M-1)."""

    mean: Tensor | None
    var: Tensor | None
    counter: Tensor | None
    momentum: float | None
    bessel: float | Tensor

    def track(self, batch_mean: Tensor, batch_var: Tensor) -> None:
        """Count the step and fold the batch's mean and biased variance in."""
        factor = step_factor(self.momentum, self.counter, self.mean is not None)
        update(self.mean, self.var, batch_mean, batch_var, factor, self.bessel)


def bessel(count: int | Tensor) -> float | Tensor:
    """M / (M - 1), Bessel's factor (1 for M = 1) (7.2); a tensor for a tensor ``count``
    (SyncBatchNorm's global count: reading it on the host would cost a sync a step)."""
    if isinstance(count, Tensor):
        return count / (count - 1).clamp_min(1)
    return count / max(count - 1, 1)


def step_factor(
    momentum: float | None, num_batches_tracked: Tensor | None, tracking: bool
) -> float:
    """Count one step (when ``tracking`` and a counter is given) and return m (7.3);
    ValueError for ``momentum=None`` while tracking without a counter."""
    if num_batches_tracked is not None and tracking:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return float(momentum)
    if not tracking:
        return 0.0
    if num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_batches_tracked, the step "
            "counter; pass it or give a float momentum"
        )
    return 1.0 / float(num_batches_tracked)


def update(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    factor: float,
    bessel: float | Tensor,
) -> None:
    """Move the buffers toward the batch's ``mean`` and biased ``var`` (7.1), (7.2)."""
    if isinstance(bessel, Tensor):
        bessel = bessel.to(var.dtype)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
        if running_var is not None:
            running_var.lerp_((var * bessel).to(running_var.dtype), factor)


def track_batch(module: nn.Module, mean: Tensor, var: Tensor, count: int) -> None:
    """Count one batch in a BatchNorm-like ``module`` and fold its ``(C,)`` mean and
    *biased* variance, each over ``count`` values, into its running buffers."""
    buffers = (module.running_mean, module.running_var, module.num_batches_tracked)
    with torch.no_grad():
        RunningStats(*buffers, module.momentum, bessel(count)).track(mean, var)
