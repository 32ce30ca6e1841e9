"""Model builders: MLPs and small CNNs with a choice of width, depth, activation,
normalization, its placement, and initialization.

Module names are stable so that probes can address layers by pattern: an MLP has
``hidden.<i>.linear``, ``hidden.<i>.norm`` (absent without normalization),
``hidden.<i>.act`` and ``head``; the input of ``hidden.<i>.act`` is the
pre-activation that Ioffe & Szegedy (2015, Fig. 1) plot.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from covshift.nn import create_norm, norm_names

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "INITS",
    "MLP",
    "VGG",
    "HiddenBlock",
    "build_cnn",
    "build_deep_linear",
    "build_mlp",
    "build_vgg",
    "cancels_bias",
]

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
