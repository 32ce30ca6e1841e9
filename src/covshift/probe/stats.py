"""Per-unit statistics of a layer's values on one probe batch.

A *unit* is a feature of a fully connected layer or a channel of a convolution. For a
tensor of shape ``(N, C, *spatial)`` the values of unit ``c`` are all ``N * prod(spatial)``
entries of channel ``c`` (the examples and positions the unit sees); for ``(N, C)`` they
are the ``N`` examples. Everything is computed on the tensor's device in float32 or
better, so a record costs one transfer to the host, not one per statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["unit_moments", "unit_quantiles", "unit_view"]


def unit_view(x: torch.Tensor) -> torch.Tensor:
    """Arrange values as ``(M, U)``: rows are observations, columns are units.

    ``(N, U)`` is returned as is; ``(N, C, *spatial)`` becomes ``(N * prod(spatial), C)``.
    """
    if x.dim() < 2:
        raise ValueError(f"expected a batch of shape (N, C, ...), got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return x
    return x.transpose(0, 1).reshape(x.shape[1], -1).t()  # (N, C, *S) -> (C, N*S) -> (N*S, C)


def unit_quantiles(values: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """Per-unit quantiles of ``(M, U)`` values, shape ``(len(quantiles), U)``.

    Linear interpolation between order statistics (numpy's default ``linear``
    method): ``Q(q) = v[(M-1) q]`` interpolated, ``v`` sorted per unit.
    """
    if not all(0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    v = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    q = torch.tensor(list(quantiles), dtype=v.dtype, device=v.device)
    return torch.quantile(v, q, dim=0)


def unit_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and standard deviation (biased, 1/M) of ``(M, U)`` values,
    accumulated in float64."""
    v = values.double()
    mean = v.mean(dim=0)
    std = (v - mean).square().mean(dim=0).sqrt()
    return mean, std
