"""What every model builder shares: the choices (activations, initializations), which
norms make a bias redundant, the checks of those arguments, the weight initialization,
and :class:`HiddenBlock`, the ``linear``/``norm``/``act`` unit every network is made of.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from covshift.nn import norm_names

__all__ = ["ACTIVATIONS", "INITS", "HiddenBlock", "cancels_bias"]

Activation = Literal["sigmoid", "tanh", "relu", "identity", "linear"]
Placement = Literal["before", "after"]
Init = Literal["gaussian", "xavier", "he", "torch"]

# ``identity`` and ``linear`` are the same (no non-linearity): a network of linear maps,
# the control of "non-linear activations make the shift worse".
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "linear": nn.Identity,
}
INITS = ("gaussian", "xavier", "he", "torch")

# Norms that subtract a per-channel mean computed over the batch (or over each
# channel's own values): a per-channel bias added just before them cancels out,
# so the preceding layer drops it and the norm's beta takes its role (Ioffe &
# Szegedy 2015, Sec. 3.2). LayerNorm/RMSNorm do not cancel a per-feature bias.
_BIAS_CANCELLING = {"batch", "batch_renorm", "ghost_batch", "batch_noisy", "sync_batch", "instance"}
# Norms whose statistics are over each sample's spatial positions only.
_NEEDS_POSITIONS = {"instance"}


def cancels_bias(norm: str) -> bool:
    """True when a bias added right before ``norm`` has no effect on its output."""
    return norm in _BIAS_CANCELLING


def _check_choice(arg: str, value: str, choices: list[str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {', '.join(choices)}; got {value!r}")


def _check_block_args(
    activation: str, norm: str, norm_position: str, init: str, init_std: float
) -> None:
    """The arguments every builder's blocks share: each a known choice."""
    _check_choice("activation", activation, tuple(ACTIVATIONS))
    _check_choice("norm", norm, ["none", *norm_names()])
    _check_choice("norm_position", norm_position, ("before", "after"))
    _check_choice("init", init, INITS)
    if init == "gaussian" and not init_std > 0:
        raise ValueError(f"init_std must be > 0 for the gaussian init, got {init_std}")


def _init_weights(
    layer: nn.Linear | nn.Conv2d,
    init: Init,
    std: float,
    activation: Activation,
    generator: torch.Generator,
) -> None:
    """Initialize a Linear/Conv weight in place from ``generator``; biases start at zero.

    - ``gaussian``: N(0, std^2), the scheme of the public Ioffe & Szegedy reproductions.
    - ``xavier``: Glorot & Bengio 2010 normal, std = gain * sqrt(2 / (fan_in + fan_out)).
    - ``he``: He et al. 2015 normal, std = gain * sqrt(1 / fan_in) (gain sqrt(2) for ReLU).
    - ``torch``: torch.nn's default (Kaiming-uniform with a=sqrt(5)), weight and bias.

    Drawing from a dedicated generator makes the weights independent of whether the
    layers have biases, so networks that differ only in normalization start from the
    same weights.
    """
    if init == "torch":
        return
    fan_out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    receptive = layer.weight[0, 0].numel()
    gain = nn.init.calculate_gain("linear" if activation == "identity" else activation)
    if init == "xavier":
        std = gain * math.sqrt(2.0 / (fan_in + fan_out * receptive))
    elif init == "he":
        std = gain / math.sqrt(fan_in)
    with torch.no_grad():
        layer.weight.normal_(0.0, std, generator=generator)
        if layer.bias is not None:
            layer.bias.zero_()


class HiddenBlock(nn.Module):
    """One hidden layer: ``act(norm(linear(x)))`` (norm before) or ``norm(act(linear(x)))``."""

    def __init__(
        self, linear: nn.Module, norm: nn.Module | None, act: nn.Module, norm_position: Placement
    ) -> None:
        super().__init__()
        self.linear = linear
        if norm is not None:
            self.norm = norm
        self.act = act
        self.norm_position = norm_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        norm = getattr(self, "norm", None)
        if norm is None:
            return self.act(x)
        if self.norm_position == "before":
            return self.act(norm(x))
        return norm(self.act(x))

    def extra_repr(self) -> str:
        return f"norm_position={self.norm_position!r}"
