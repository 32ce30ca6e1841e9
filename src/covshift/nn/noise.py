"""Santurkar et al.'s "noisy BN": time-varying noise injected after a norm layer.

Santurkar, Tsipras, Ilyas & Madry 2018 (arXiv 1805.11604), Section 2.1: per step
``mu_t ~ U(-0.5, 0.5)``, ``sigma_t ~ U(1, 1.25)``, then per element
``m ~ U(mu_t ± 0.1)``, ``s ~ N(sigma_t, 0.1)`` and ``a <- s·a + m`` (``s``, ``m``
constants for backprop); no noise in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NoisyNorm", "NormNoise", "TimeVaryingNoise"]


class TimeVaryingNoise(nn.Module):
    """Santurkar et al.'s non-stationary noise ``a <- s * a + m`` (the module docstring:
    ``mean_range`` bounds ``mu_t``, ``scale_range`` ``sigma_t``, ``mean_spread`` and
    ``scale_std`` the per-element spreads), to place after a norm; identity in eval.
    ``generator`` (any device; default the global RNG) makes runs reproducible.

    Example: ``nn.Sequential(nn.BatchNorm1d(4), TimeVaryingNoise(generator=gen))``.
    """

    def __init__(
        self,
        mean_range: tuple[float, float] = (-0.5, 0.5),
        scale_range: tuple[float, float] = (1.0, 1.25),
        mean_spread: float = 0.1,
        scale_std: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, (lo, hi) in (("mean_range", mean_range), ("scale_range", scale_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)!r}")
        for name, value in (("mean_spread", mean_spread), ("scale_std", scale_std)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.mean_range = (float(mean_range[0]), float(mean_range[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.mean_spread = float(mean_spread)
        self.scale_std = float(scale_std)
        self.generator = generator

    def sample(
        self, shape: torch.Size, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """One step's draws ``(s, m)`` of the given shape, as used by :meth:`forward`."""
        gen = self.generator
        # Draw where the generator lives (a CPU generator cannot feed a CUDA kernel),
        # in float32 at least (half-precision uniforms are coarse), then move and cast.
        draw = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"generator": gen, "device": device if gen is None else gen.device, "dtype": draw}
        u = torch.rand(2, **kw)  # (2,) the per-step scalars mu_t, sigma_t
        mu_t = self.mean_range[0] + (self.mean_range[1] - self.mean_range[0]) * u[0]
        sigma_t = self.scale_range[0] + (self.scale_range[1] - self.scale_range[0]) * u[1]
        m = mu_t + self.mean_spread * (2 * torch.rand(shape, **kw) - 1)  # U(mu_t -+ spread)
        s = sigma_t + self.scale_std * torch.randn(shape, **kw)  # N(sigma_t, scale_std)
        return s.to(device=device, dtype=dtype), m.to(device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return input
        s, m = self.sample(input.shape, input.device, input.dtype)
        return torch.addcmul(m, s, input)  # s * a + m, s and m constants for autograd

    def extra_repr(self) -> str:
        return (
            f"mean_range={self.mean_range}, scale_range={self.scale_range}, "
            f"mean_spread={self.mean_spread}, scale_std={self.scale_std}"
        )


class NoisyNorm(nn.Module):
    """A norm layer (``.norm``, which convert and torch's helpers can swap) followed by
    :class:`TimeVaryingNoise(**noise_kw)`, Santurkar et al.'s "noisy BN":
    ``y = s * norm(x) + m`` in training, ``norm(x)`` in eval.

    Example: ``NoisyNorm(nn.BatchNorm2d(3), generator=torch.Generator().manual_seed(0))``.
    """

    def __init__(self, norm: nn.Module, **noise_kw: object) -> None:
        super().__init__()
        self.norm = norm
        self.noise = TimeVaryingNoise(**noise_kw)  # type: ignore[arg-type]

    def forward(self, input: Tensor) -> Tensor:
        return self.noise(self.norm(input))


# TimeVaryingNoise's name until 0.1.0 (it read too much like NoisyNorm), still accepted.
NormNoise = TimeVaryingNoise
