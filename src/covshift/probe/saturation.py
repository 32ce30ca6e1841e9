"""Saturation: how many of an activation's inputs fall where it does not respond.

A sigmoid or tanh is *saturated* where its slope is a small fraction of its peak
slope: gradients through it vanish (Ioffe & Szegedy 2015, Sec. 1). With ``r`` that
fraction (``slope``, default 0.05)::

    sigmoid'(x) / sigmoid'(0) = sech^2(x / 2) < r   <=>   |x| > 2 acosh(1 / sqrt(r))   (4.36)
    tanh'(x)    / tanh'(0)    = sech^2(x)     < r   <=>   |x| >   acosh(1 / sqrt(r))   (2.18)

A ReLU is *dead* for an input below zero (slope exactly 0): the fraction reported for
ReLU-like activations (ReLU, ReLU6, LeakyReLU, RReLU, PReLU) is that of inputs ``< 0``.
Other activations get no saturation figure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["activation_kind", "saturated", "tail_threshold"]

_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu"),
    (nn.LeakyReLU, "relu"),
    (nn.RReLU, "relu"),
    (nn.PReLU, "relu"),
)


def activation_kind(module: nn.Module) -> str | None:
    """``"sigmoid"``, ``"tanh"``, ``"relu"`` (any ReLU-like) or None."""
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return None


def tail_threshold(kind: str, slope: float) -> float:
    """``t`` such that ``|x| > t`` is where the ``kind``'s slope is below ``slope`` times
    its peak (see the module docstring); 0 for ``relu`` (inputs below zero)."""
    if not 0.0 < slope < 1.0:
        raise ValueError(f"saturation slope must be a fraction in (0, 1), got {slope}")
    base = math.acosh(1.0 / math.sqrt(slope))
    if kind == "sigmoid":
        return 2.0 * base
    if kind == "tanh":
        return base
    if kind == "relu":
        return 0.0
    raise ValueError(f"activation kind must be 'sigmoid', 'tanh' or 'relu', got {kind!r}")


def saturated(values: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    """Per-unit count of saturated values of ``(M, U)`` inputs: shape ``(U,)``, float64."""
    if kind == "relu":
        mask = values < 0
    else:
        mask = values.abs() > tail_threshold(kind, slope)
    return mask.sum(dim=0, dtype=torch.float64)
