"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275).

Training corrects BatchNorm towards the running statistics, so that training and
inference compute the same function in expectation (docs/derivations.md §13)::

    r = clip(σ_B / σ_run, 1/r_max, r_max)     d = clip((μ_B - μ_run) / σ_run, -d_max, d_max)
    y = γ · (x̂ · r + d) + β                   (r, d constants in backprop)

r_max and d_max: a warmup then linear ramps (the paper's "gradually") over
``num_batches_tracked`` (:func:`renorm_limits`); eval is BatchNorm.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from covshift.nn import checks, registry
from covshift.nn import functional as F
from covshift.nn._base import BatchNormVariant
from covshift.nn.running import track_batch

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_limits"]


def renorm_limits(
    step: Any,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_ramp_steps: int = 35000,
    d_max_ramp_steps: int = 20000,
) -> tuple[Any, Any]:
    """``(r_max(t), d_max(t))`` of the schedule at step ``t`` (see the module docstring):
    floats for an int ``step``, tensors for a tensor (no host sync in training).

    Example:
        >>> renorm_limits(0), renorm_limits(5000 + 17500), renorm_limits(10**6)
        ((1.0, 0.0), (2.0, 4.375), (3.0, 5.0))
    """

    def ramp(length: int) -> Any:
        if length == 0:
            on = step >= warmup_steps
            return on.to(step.dtype) if isinstance(on, Tensor) else float(on)
        t = (step - warmup_steps) / length
        return t.clamp(0, 1) if isinstance(t, Tensor) else min(max(t, 0.0), 1.0)

    return 1.0 + (r_max - 1.0) * ramp(r_max_ramp_steps), d_max * ramp(d_max_ramp_steps)


_SCHEDULE = ("r_max", "d_max", "warmup_steps", "r_max_ramp_steps", "d_max_ramp_steps")


def _check_schedule(r_max: float, d_max: float, *steps: int) -> tuple[Any, ...]:
    for name, value, low, what in (
        ("r_max", r_max, 1, "r is clipped to [1/r_max, r_max]; 1 disables the correction"),
        ("d_max", d_max, 0, "d is clipped to [-d_max, d_max]; 0 disables the correction"),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= low:
            raise ValueError(f"{name} must be a float >= {low} ({what}), got {value!r}")
    for name, value in zip(_SCHEDULE[2:], steps, strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (a number of steps), got {value!r}")
    return (float(r_max), float(d_max), *map(int, steps))


class _BatchRenorm(BatchNormVariant):
    """BatchNorm's forward with the per-channel affine w' = γ·r, b' = γ·d + β in training,
    r and d constants, (13.1)-(13.3)."""

    _doc_template = """Batch Renormalization of {shape} inputs (Ioffe 2017, arXiv 1702.03275).

    Training: ``y = γ · (x̂ · r + d) + β`` with x̂ BatchNorm's, ``r`` and ``d`` the
    clipped corrections towards the running statistics (constants in backprop); eval,
    and training with ``track_running_stats=False``: BatchNorm. BatchNorm's arguments,
    and the schedule of :func:`renorm_limits`: the final clips ``r_max`` (>= 1, default 3)
    and ``d_max`` (>= 0, default 5), reached after ``warmup_steps`` (5000) and linear
    ramps of ``r_max_ramp_steps`` (35000) and ``d_max_ramp_steps`` (20000) batches.

    Example: ``{name}(16, warmup_steps=0, r_max_ramp_steps=1000, d_max_ramp_steps=1000)``.
    """

    def __init__(
        self,
        *args: Any,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_steps: int = 35000,
        d_max_ramp_steps: int = 20000,
        **kwargs: Any,
    ) -> None:
        schedule = _check_schedule(r_max, d_max, warmup_steps, r_max_ramp_steps, d_max_ramp_steps)
        super().__init__(*args, **kwargs)
        self.r_max, self.d_max = schedule[:2]
        self.warmup_steps, self.r_max_ramp_steps, self.d_max_ramp_steps = schedule[2:]

    def _schedule(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _SCHEDULE)

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` that the next training batch will use (reads the counter)."""
        step = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        return renorm_limits(step, *self._schedule())

    def _limits(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # The schedule from the counter as device tensors: no host sync per step.
        assert self.num_batches_tracked is not None
        return renorm_limits(self.num_batches_tracked.to(dtype), *self._schedule())

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats):
            # Eval: running statistics, as BatchNorm. Training without running
            # statistics has nothing to renormalize towards: plain BatchNorm.
            return super().forward(x)
        assert self.running_mean is not None and self.running_var is not None
        self._check_input_dim(x)
        dims = (0, *range(2, x.dim()))
        with torch.no_grad():
            mean, var = F.moments(x, dims)  # (C,) each, float32 at least
            if mean.numel():  # (an empty batch has no statistics to renormalize with)
                checks.values_per_channel(x.shape, x.numel() // x.shape[1], empty_ok=False)
            r_max, d_max = self._limits(mean.dtype)
            run_mean = self.running_mean.to(mean.dtype)
            sigma_run = torch.sqrt(self.running_var.to(mean.dtype) + self.eps)
            r = torch.clamp(torch.sqrt(var + self.eps) / sigma_run, 1 / r_max, r_max)  # (13.1)
            d = torch.clamp((mean - run_mean) / sigma_run, -d_max, d_max)  # (13.1)
        # γ · (x̂ · r + d) + β as one per-channel affine of x̂ (13.2); r and d are
        # constants, so autograd gives dγ = Σ(dy · x̂) · r + Σdy · d (13.3).
        weight = r if self.weight is None else self.weight * r.to(self.weight.dtype)
        shift = d if self.weight is None else self.weight * d.to(self.weight.dtype)
        bias = shift if self.bias is None else shift + self.bias
        y = F.normalize(x, dims, weight, bias, eps=self.eps, channel_dim=1)
        track_batch(self, mean, var, x.numel() // x.shape[1])  # (7.1)-(7.3)
        return y

    def extra_repr(self) -> str:
        own = ", ".join(f"{n}={v}" for n, v in zip(_SCHEDULE, self._schedule(), strict=True))
        return f"{super().extra_repr()}, {own}"


class BatchRenorm1d(_BatchRenorm, dims=1): ...


class BatchRenorm2d(_BatchRenorm, dims=2): ...


class BatchRenorm3d(_BatchRenorm, dims=3): ...


registry.register_kind(
    registry.NormKind(
        "batch_renorm",
        {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
        batch_statistics=True,
    )
)
