"""Fully connected networks: :class:`MLP`, built as Ioffe & Szegedy's classifier
(:func:`build_mlp`) or as Santurkar et al.'s deep linear network
(:func:`build_deep_linear`)."""

from __future__ import annotations

import torch
from torch import nn

from covshift.models.blocks import (
    _NEEDS_POSITIONS,
    ACTIVATIONS,
    INITS,
    Activation,
    HiddenBlock,
    Init,
    Placement,
    _check_block_args,
    _check_choice,
    _init_weights,
    cancels_bias,
)
from covshift.nn import create_norm, norm_names

__all__ = ["MLP", "build_deep_linear", "build_mlp"]


class MLP(nn.Module):
    """Fully connected classifier: ``depth`` hidden blocks then a linear ``head``."""

    def __init__(self, hidden: nn.ModuleList, head: nn.Linear) -> None:
        super().__init__()
        self.hidden = hidden
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, K)
        x = x.flatten(1)
        for block in self.hidden:
            x = block(x)
        return self.head(x)


def build_mlp(
    in_features: int,
    num_classes: int,
    *,
    width: int = 100,
    depth: int = 3,
    activation: Activation = "sigmoid",
    norm: str = "none",
    norm_position: Placement = "before",
    init: Init = "gaussian",
    init_std: float = 0.1,
    norm_kwargs: dict[str, object] | None = None,
    seed: int = 0,
) -> MLP:
    """Build an MLP like the one of Ioffe & Szegedy 2015, Fig. 1 (3 x 100 sigmoid).

    Args:
        in_features: input size (784 for 28x28 images).
        num_classes: output size.
        width: units per hidden layer.
        depth: number of hidden layers.
        activation: ``sigmoid``, ``tanh``, ``relu`` or ``identity`` (= ``linear``: none).
        norm: ``none`` or any name of :func:`covshift.nn.norm_names`.
        norm_position: ``before`` the activation (the paper's choice) or ``after`` it.
        init: ``gaussian`` (std ``init_std``), ``xavier``, ``he`` or ``torch``.
        init_std: standard deviation of the ``gaussian`` init.
        norm_kwargs: extra keyword arguments for the norm layers (eps, momentum, ...).
        seed: seed of the weight initialization (and of torch's default init).

    A Linear followed directly by a bias-cancelling norm (batch statistics) has no bias.

    Example:
        >>> net = build_mlp(784, 10, norm="batch")
        >>> net(torch.rand(60, 784)).shape
        torch.Size([60, 10])
    """
    for arg, value in {
        "in_features": in_features,
        "num_classes": num_classes,
        "width": width,
        "depth": depth,
    }.items():
        if value < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    _check_block_args(activation, norm, norm_position, init, init_std)
    if norm in _NEEDS_POSITIONS:
        raise ValueError(
            f"norm {norm!r} normalizes each sample's channel over spatial "
            "positions, and an MLP has none; use it in a CNN (build_cnn)"
        )
    bias = not (norm != "none" and norm_position == "before" and cancels_bias(norm))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = []
        for i in range(depth):
            linear = nn.Linear(in_features if i == 0 else width, width, bias=bias)
            _init_weights(linear, init, init_std, activation, generator)
            layer_norm = None if norm == "none" else create_norm(norm, width, **(norm_kwargs or {}))
            blocks.append(HiddenBlock(linear, layer_norm, ACTIVATIONS[activation](), norm_position))
        head = nn.Linear(width, num_classes)
        _init_weights(head, init, init_std, activation, generator)
    return MLP(nn.ModuleList(blocks), head)


def build_deep_linear(
    in_features: int,
    out_features: int,
    *,
    depth: int = 25,
    width: int | None = None,
    norm: str = "none",
    init: Init = "xavier",
    init_std: float = 0.1,
    norm_kwargs: dict[str, object] | None = None,
    seed: int = 0,
) -> MLP:
    """Santurkar et al. 2018's deep linear network: ``W_depth ... W_1 x`` (no biases, no
    non-linearity), optionally with a norm after each of the first ``depth - 1`` maps.

    The network is an :class:`MLP` with ``depth - 1`` hidden blocks (``hidden.<i>``,
    identity activations) of ``width`` units (default ``in_features``) and a linear
    ``head``; their setup is 25 layers of 10 x 10 maps fitting ``y = A x`` (the
    ``linear-regression`` dataset).

    Example:
        >>> net = build_deep_linear(10, 10, depth=25, norm="batch")
        >>> net(torch.randn(4, 10)).shape
        torch.Size([4, 10])
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2 (hidden maps and the last map), got {depth}")
    if in_features < 1 or out_features < 1:
        raise ValueError("in_features and out_features must be >= 1")
    _check_choice("norm", norm, ["none", *norm_names()])
    _check_choice("init", init, INITS)
    if norm in _NEEDS_POSITIONS:
        raise ValueError(f"norm {norm!r} needs spatial positions; a deep linear network has none")
    units = width or in_features
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = []
        for i in range(depth - 1):
            linear = nn.Linear(in_features if i == 0 else units, units, bias=False)
            _init_weights(linear, init, init_std, "identity", generator)
            layer_norm = None if norm == "none" else create_norm(norm, units, **(norm_kwargs or {}))
            blocks.append(HiddenBlock(linear, layer_norm, nn.Identity(), "before"))
        head = nn.Linear(units, out_features, bias=False)
        _init_weights(head, init, init_std, "identity", generator)
    return MLP(nn.ModuleList(blocks), head)
