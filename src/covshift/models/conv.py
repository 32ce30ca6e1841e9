"""Convolutional networks: a small :class:`CNN` (:func:`build_cnn`) and a VGG-style
one (:func:`build_vgg`), both of 3x3 conv blocks named like the MLP's
(``features.<i>.linear``/``norm``/``act``, ``linear`` being the conv)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from covshift.models.blocks import (
    ACTIVATIONS,
    Activation,
    HiddenBlock,
    Init,
    Placement,
    _check_block_args,
    _check_choice,
    _init_weights,
    cancels_bias,
)
from covshift.nn import create_norm

__all__ = ["CNN", "VGG", "build_cnn", "build_vgg"]


def _conv_block(
    conv: nn.Conv2d,
    activation: Activation,
    norm: str,
    norm_position: Placement,
    init: Init,
    init_std: float,
    norm_kwargs: dict[str, object] | None,
    generator: torch.Generator,
) -> HiddenBlock:
    """``conv`` initialized from ``generator``, with its norm (over its output channels)
    and activation: one block of :func:`build_cnn` or :func:`build_vgg`."""
    _init_weights(conv, init, init_std, activation, generator)
    layer_norm = (
        None
        if norm == "none"
        else create_norm(norm, conv.out_channels, dims=2, **(norm_kwargs or {}))
    )
    return HiddenBlock(conv, layer_norm, ACTIVATIONS[activation](), norm_position)


class CNN(nn.Module):
    """Convolutional classifier: conv blocks (3x3, stride 2 after the first), then a
    linear ``head`` on the globally average-pooled channels (``pool="avg"``) or on the
    whole flattened feature map (``pool="flatten"``). Blocks are ``features.<i>`` with
    the same ``linear``/``norm``/``act`` names as the MLP's (``linear`` is the conv)."""

    def __init__(
        self,
        features: nn.ModuleList,
        head: nn.Linear,
        image_shape: tuple[int, int, int],
        pool: Literal["avg", "flatten"] = "avg",
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.image_shape = image_shape
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.image_shape)  # (N, C, H, W)
        for block in self.features:
            x = block(x)
        if self.pool == "flatten":
            return self.head(x.flatten(1))  # (N, C*H*W) -> (N, K)
        return self.head(x.mean(dim=(2, 3)))  # global average pool -> (N, C) -> (N, K)


def build_cnn(
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    channels: tuple[int, ...] = (16, 32, 64),
    activation: Activation = "relu",
    norm: str = "none",
    norm_position: Placement = "before",
    init: Init = "he",
    init_std: float = 0.05,
    norm_kwargs: dict[str, object] | None = None,
    seed: int = 0,
    pool: Literal["avg", "flatten"] = "avg",
) -> CNN:
    """Build a small CNN; see :func:`build_mlp` for the shared arguments.

    Each block is Conv2d(3x3, padding 1; stride 1 for the first block, 2 after) with
    the norm before or after the activation; ``pool`` chooses the head's input (global
    average pooling, or the flattened map, which learns much faster on 28x28 images).
    """
    _check_choice("pool", pool, ("avg", "flatten"))
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels}")
    _check_block_args(activation, norm, norm_position, init, init_std)
    bias = not (norm != "none" and norm_position == "before" and cancels_bias(norm))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = []
        in_ch = image_shape[0]
        for i, out_ch in enumerate(channels):
            conv = nn.Conv2d(in_ch, out_ch, 3, stride=1 if i == 0 else 2, padding=1, bias=bias)
            blocks.append(
                _conv_block(
                    conv, activation, norm, norm_position, init, init_std, norm_kwargs, generator
                )
            )
            in_ch = out_ch
        side_h, side_w = image_shape[1], image_shape[2]
        for _ in channels[1:]:  # every block after the first halves the map (stride 2)
            side_h, side_w = (side_h + 1) // 2, (side_w + 1) // 2
        head = nn.Linear(in_ch * side_h * side_w if pool == "flatten" else in_ch, num_classes)
        _init_weights(
            head, "xavier", init_std, "linear" if activation != "relu" else "relu", generator
        )
    return CNN(nn.ModuleList(blocks), head, image_shape, pool)


class VGG(nn.Module):
    """VGG-style classifier (Simonyan & Zisserman 2014, at small scale): stages of 3x3
    conv blocks (``features.<i>``, same ``linear``/``norm``/``act`` names as the MLP's),
    a 2x2 max-pool after each stage, global average pooling and a linear ``head``."""

    def __init__(
        self,
        features: nn.ModuleList,
        pool_after: frozenset[int],
        head: nn.Linear,
        image_shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.features = features
        self.pool_after = pool_after
        self.head = head
        self.image_shape = image_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.image_shape)  # (N, C, H, W)
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.pool_after:
                x = torch.nn.functional.max_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)))

    def extra_repr(self) -> str:
        return f"pool_after={sorted(self.pool_after)}"


def build_vgg(
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width: int = 16,
    depth: int = 4,
    convs_per_stage: int = 2,
    activation: Activation = "relu",
    norm: str = "none",
    norm_position: Placement = "before",
    init: Init = "he",
    init_std: float = 0.05,
    norm_kwargs: dict[str, object] | None = None,
    seed: int = 0,
) -> VGG:
    """A small VGG-style CNN, the kind of network Santurkar et al. 2018 test BN on.

    ``depth`` 3x3 conv layers (padding 1), grouped ``convs_per_stage`` to a stage; stage
    ``s`` has ``width * 2**s`` channels and ends with a 2x2 max-pool while the feature
    map is at least 2 pixels on a side. See :func:`build_mlp` for the shared arguments.

    Example:
        >>> net = build_vgg((1, 28, 28), 10, width=8, depth=4, norm="batch")
        >>> net(torch.rand(2, 784)).shape
        torch.Size([2, 10])
    """
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    for arg, value in {"width": width, "depth": depth, "convs_per_stage": convs_per_stage}.items():
        if value < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    _check_block_args(activation, norm, norm_position, init, init_std)
    bias = not (norm != "none" and norm_position == "before" and cancels_bias(norm))
    generator = torch.Generator().manual_seed(seed)
    pool_after: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = []
        in_ch, side = image_shape[0], min(image_shape[1:])
        for i in range(depth):
            out_ch = width * 2 ** (i // convs_per_stage)
            conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)
            blocks.append(
                _conv_block(
                    conv, activation, norm, norm_position, init, init_std, norm_kwargs, generator
                )
            )
            in_ch = out_ch
            if (i + 1) % convs_per_stage == 0 and side >= 2:
                pool_after.add(i)
                side //= 2
        head = nn.Linear(in_ch, num_classes)
        _init_weights(head, "xavier", init_std, "linear", generator)
    return VGG(nn.ModuleList(blocks), frozenset(pool_after), head, image_shape)
