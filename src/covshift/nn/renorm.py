"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275).

In training, BatchNorm's output is corrected towards what the running statistics
would give, so that training and inference compute the same function in
expectation (which matters for small or non-i.i.d. batches)::

    sigma_B   = sqrt(var_B + eps)             sigma_run = sqrt(running_var + eps)
    r = clip(sigma_B / sigma_run, 1/r_max, r_max)
    d = clip((mu_B - running_mean) / sigma_run, -d_max, d_max)
    y = gamma * (xhat * r + d) + beta,        xhat = (x - mu_B) / sigma_B

``r`` and ``d`` are treated as constants in backprop (``stop_gradient`` in the
paper): the gradient is BatchNorm's with ``gamma`` replaced by ``gamma * r``, and
``dgamma = sum(dy * (xhat * r + d))``. In eval the running statistics normalize, as
in BatchNorm. With ``r_max = 1, d_max = 0`` it *is* BatchNorm.

The schedule (Section 4 of the paper: "r_max = 1, d_max = 0 for the first 5000
training steps, after which these were gradually relaxed to reach r_max = 3 at 40k
steps, and d_max = 5 at 25k steps") is given by ``warmup_steps`` and the lengths of
two linear ramps after it::

    t = num_batches_tracked before the current batch (0 on the first one)
    r_max(t) = 1 + (r_max - 1) * clip((t - warmup_steps) / r_max_ramp_steps, 0, 1)
    d_max(t) =      d_max      * clip((t - warmup_steps) / d_max_ramp_steps, 0, 1)

(a ramp of 0 steps jumps to the final value at ``warmup_steps``). The paper says
"gradually" without a shape; linear is the choice here. The step is the layer's
own ``num_batches_tracked`` buffer, so it survives checkpoints and counts the
batches this layer has seen in training mode.

Running statistics follow BatchNorm exactly (``running_var`` stores the *unbiased*
batch variance, momentum convention of torch), so a BatchNorm state_dict loads into
these layers and back. The paper averages ``sigma`` instead; with ``r`` correcting
towards whatever the running estimate holds, train and eval stay consistent either
way.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from covshift.nn import checks, registry
from covshift.nn import functional as F
from covshift.nn._base import BatchNormVariant
from covshift.nn.running import track_batch

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_limits"]


def _ramp(step: float, start: int, length: int) -> float:
    if length == 0:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / length, 0.0), 1.0)


def renorm_limits(
    step: int,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_ramp_steps: int = 35000,
    d_max_ramp_steps: int = 20000,
) -> tuple[float, float]:
    """``(r_max(t), d_max(t))`` of the schedule at step ``t`` (see the module docstring).

    Example:
        >>> renorm_limits(0), renorm_limits(5000 + 17500), renorm_limits(10**6)
        ((1.0, 0.0), (2.0, 4.375), (3.0, 5.0))
    """
    r = 1.0 + (r_max - 1.0) * _ramp(step, warmup_steps, r_max_ramp_steps)
    d = d_max * _ramp(step, warmup_steps, d_max_ramp_steps)
    return r, d


def _check_schedule(
    r_max: float, d_max: float, warmup: int, r_ramp: int, d_ramp: int
) -> tuple[float, float]:
    if isinstance(r_max, bool) or not isinstance(r_max, numbers.Real) or not r_max >= 1:
        raise ValueError(
            f"r_max must be a float >= 1 (r is clipped to [1/r_max, r_max]; 1 disables "
            f"the scale correction), got {r_max!r}"
        )
    if isinstance(d_max, bool) or not isinstance(d_max, numbers.Real) or not d_max >= 0:
        raise ValueError(
            f"d_max must be a float >= 0 (d is clipped to [-d_max, d_max]; 0 disables "
            f"the shift correction), got {d_max!r}"
        )
    for name, value in (
        ("warmup_steps", warmup),
        ("r_max_ramp_steps", r_ramp),
        ("d_max_ramp_steps", d_ramp),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (a number of steps), got {value!r}")
    return float(r_max), float(d_max)


class _BatchRenorm(BatchNormVariant):
    """Batch Renorm's training forward on top of covshift's BatchNorm.

    The math: BatchNorm's normalization (:func:`covshift.nn.functional.normalize`, so
    :func:`covshift.nn.reference.forward` / ``backward`` over the channel layout) with
    the per-channel affine w' = γ·r, b' = γ·d + β, r and d constants (13.1)-(13.3).
    Derivation: docs/derivations.md §13. Tests: tests/nn/test_variants.py
    (``test_renorm_*``).
    """

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
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_steps: int = 35000,
        d_max_ramp_steps: int = 20000,
        bias: bool = True,
    ) -> None:
        r_max, d_max = _check_schedule(
            r_max, d_max, warmup_steps, r_max_ramp_steps, d_max_ramp_steps
        )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = int(warmup_steps)
        self.r_max_ramp_steps = int(r_max_ramp_steps)
        self.d_max_ramp_steps = int(d_max_ramp_steps)

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` that the next training batch will use (reads the counter)."""
        step = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        return renorm_limits(
            step,
            self.r_max,
            self.d_max,
            self.warmup_steps,
            self.r_max_ramp_steps,
            self.d_max_ramp_steps,
        )

    def _limits(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # The schedule from the counter as device tensors: no host sync per step.
        step = self.num_batches_tracked.to(dtype)

        def ramp(length: int) -> Tensor:
            if length == 0:
                return (step >= self.warmup_steps).to(dtype)
            return ((step - self.warmup_steps) / length).clamp(0, 1)

        r_max = 1 + (self.r_max - 1) * ramp(self.r_max_ramp_steps)
        d_max = self.d_max * ramp(self.d_max_ramp_steps)
        return r_max, d_max

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats):
            # Eval: running statistics, as BatchNorm. Training without running
            # statistics has nothing to renormalize towards: plain BatchNorm.
            return super().forward(x)
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
        # gamma * (xhat * r + d) + beta as one per-channel affine of xhat (13.2); r and
        # d are constants, so autograd gives dgamma = sum(dy * xhat) * r + sum(dy) * d
        # (13.3).
        weight = r if self.weight is None else self.weight * r.to(self.weight.dtype)
        shift = d if self.weight is None else self.weight * d.to(self.weight.dtype)
        bias = shift if self.bias is None else shift + self.bias
        y = F.normalize(x, dims, weight, bias, eps=self.eps, channel_dim=1)
        track_batch(self, mean, var, x.numel() // x.shape[1])  # (7.1)-(7.3)
        return y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
            f"d_max_ramp_steps={self.d_max_ramp_steps}"
        )


_DOC = """Batch Renormalization over {input} (Ioffe 2017, arXiv 1702.03275).

    Training: ``y = gamma * (xhat * r + d) + beta`` with ``xhat`` BatchNorm's batch-
    normalized input, ``r = clip(sigma_B / sigma_run, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu_run) / sigma_run, -d_max, d_max)`` (``sigma = sqrt(var +
    eps)``), ``r`` and ``d`` constants in backprop. Eval: BatchNorm with the running
    statistics. ``r_max`` and ``d_max`` are reached by a schedule counted by
    ``num_batches_tracked``: 1 and 0 for ``warmup_steps`` batches, then linear ramps
    of ``r_max_ramp_steps`` and ``d_max_ramp_steps`` batches (the paper's 5k / 40k /
    25k by default); see :func:`renorm_limits`. With ``track_running_stats=False`` it
    is plain BatchNorm. Parameters and buffers are BatchNorm's (a BatchNorm
    state_dict loads).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias:
            as {base}.
        r_max: final clip of ``r``, >= 1. Default 3.
        d_max: final clip of ``d``, >= 0. Default 5.
        warmup_steps: batches with ``r_max = 1, d_max = 0`` (BatchNorm). Default 5000.
        r_max_ramp_steps: batches of the linear ramp of ``r_max`` after the warmup.
            Default 35000 (``r_max`` reached at step 40k).
        d_max_ramp_steps: same for ``d_max``. Default 20000 (reached at step 25k).

    Shape:
        Input {shape}; output the same.

    Raises:
        ValueError: r_max < 1, d_max < 0, negative step counts; the errors of {base}.

    Example:
        >>> m = {name}(16, warmup_steps=0, r_max_ramp_steps=1000, d_max_ramp_steps=1000)
        >>> y = m(torch.randn({example}))
"""


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _DOC.format(
        input="(N, C) or (N, C, L)",
        base="BatchNorm1d",
        shape="(N, C) or (N, C, L)",
        name="BatchRenorm1d",
        example="8, 16",
    )
    _ranks = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _DOC.format(
        input="(N, C, H, W)",
        base="BatchNorm2d",
        shape="(N, C, H, W)",
        name="BatchRenorm2d",
        example="8, 16, 5, 5",
    )
    _ranks = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _DOC.format(
        input="(N, C, D, H, W)",
        base="BatchNorm3d",
        shape="(N, C, D, H, W)",
        name="BatchRenorm3d",
        example="4, 16, 3, 5, 5",
    )
    _ranks = (5,)


registry.register_kind(
    registry.NormKind(
        "batch_renorm",
        {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
        {},
        batch_statistics=True,
    )
)
