"""``K`` networks of one shape as one batched network: :func:`stack_models`.

The members are built one by one, exactly as their one-at-a-time runs build them (their
own seeds, inits and frozen layers), then their values are copied into the batched
layers (:mod:`covshift.batched.layers`, :mod:`covshift.batched.norms`). The batched
network keeps the members' module names (``hidden.0.linear``, ``features.1.norm``), so
each member's parameter or buffer has one :class:`~covshift.batched.slots.Slot` in it,
through which :class:`StackedModel` copies a member in or out.

Input and output:

- an MLP (and the deep linear network) takes the members' rows ``(K, B, D)``;
- a CNN or VGG takes ``(B, K, D)`` (each example's ``K`` members side by side, so that
  the images are the channels layout ``(B, K*C, H, W)`` without a copy);
- every network returns ``(K, B, classes)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covshift.batched.layers import (
    BatchedConv2d,
    BatchedLinear,
    MemberwiseActivation,
    channels_to_rows,
)
from covshift.batched.norms import BatchedNoise, stack_norm
from covshift.batched.slots import NotBatchable, Slot
from covshift.models import CNN, MLP, VGG
from covshift.models.blocks import ACTIVATIONS, HiddenBlock

__all__ = ["BatchedCNN", "BatchedMLP", "BatchedVGG", "StackedModel", "stack_models"]

_STATELESS = tuple(set(ACTIVATIONS.values()))


class BatchedMLP(nn.Module):
    """``K`` :class:`~covshift.models.MLP` s: hidden blocks of batched Linears (and
    norms), then a batched ``head``; ``(K, B, D)`` -> ``(K, B, classes)``."""

    members_first = True

    def __init__(self, hidden: nn.ModuleList, head: BatchedLinear) -> None:
        super().__init__()
        self.hidden = hidden
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        for block in self.hidden:
            x = block(x)
        return self.head(x)


class BatchedCNN(nn.Module):
    """``K`` :class:`~covshift.models.CNN` s on the channels layout;
    ``(B, K, C*H*W)`` -> ``(K, B, classes)``."""

    members_first = False

    def __init__(
        self,
        features: nn.ModuleList,
        head: BatchedLinear,
        image_shape: tuple[int, int, int],
        pool: str,
        members: int,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.image_shape = image_shape
        self.pool = pool
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        c, h, w = self.image_shape
        x = x.reshape(x.shape[0], self.members * c, h, w)
        for block in self.features:
            x = block(x)
        if self.pool == "flatten":  # each member's (C, H, W) map, flattened
            return self.head(channels_to_rows(x, self.members))
        return self.head(channels_to_rows(x.mean(dim=(2, 3)), self.members))


class BatchedVGG(nn.Module):
    """``K`` :class:`~covshift.models.VGG` s on the channels layout (2x2 max-pools
    after each stage, global average pooling); ``(B, K, C*H*W)`` -> ``(K, B, classes)``."""

    members_first = False

    def __init__(
        self,
        features: nn.ModuleList,
        pool_after: frozenset[int],
        head: BatchedLinear,
        image_shape: tuple[int, int, int],
        members: int,
    ) -> None:
        super().__init__()
        self.features = features
        self.pool_after = pool_after
        self.head = head
        self.image_shape = image_shape
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        c, h, w = self.image_shape
        x = x.reshape(x.shape[0], self.members * c, h, w)
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        return self.head(channels_to_rows(x.mean(dim=(2, 3)), self.members))


@dataclass
class StackedModel:
    """A batched network and where each member's values are in it.

    Attributes:
        model: the batched network.
        members: K.
        slots: the member's full parameter or buffer name -> its :class:`Slot`.
        trainable: per member, the names of the parameters it trains (its frozen
            ones are left out: their values never change).
    """

    model: nn.Module
    members: int
    slots: dict[str, Slot]
    trainable: list[frozenset[str]]

    @property
    def members_first(self) -> bool:
        return bool(self.model.members_first)

    def parameter_slots(self) -> list[tuple[str, Slot]]:
        """The slots of parameters, in the order of ``model.parameters()``."""
        by_id = {id(s.tensor): (n, s) for n, s in self.slots.items() if not s.shared}
        return [by_id[id(p)] for p in self.model.parameters()]

    @torch.no_grad()
    def copy_out(self, k: int, single: nn.Module) -> None:
        """Member ``k``'s parameters and buffers into ``single`` (its own network)."""
        own = _named_tensors(single)
        pairs = [
            (own[name], slot.member(k, self.members).view_as(own[name]))
            for name, slot in self.slots.items()
        ]
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    @torch.no_grad()
    def copy_in(self, k: int, single: nn.Module) -> None:
        """``single``'s parameters and buffers into member ``k``'s slots (a shared
        counter takes the value of the member copied in)."""
        own = _named_tensors(single)
        for name, slot in self.slots.items():
            slot.member(k, self.members).copy_(
                own[name].reshape(-1) if not slot.shared else own[name]
            )

    def use_generators(self, generators: Sequence[torch.Generator]) -> None:
        """The members' random streams, for the layers that draw (noisy BN)."""
        for module in self.model.modules():
            if isinstance(module, BatchedNoise):
                module.use_generators(generators)


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _structure(model: nn.Module) -> list[tuple[str, str, str, tuple[tuple[int, ...], ...]]]:
    return [
        (
            name,
            type(m).__name__,
            m.extra_repr(),
            tuple(tuple(t.shape) for t in [*m.parameters(False), *m.buffers(False)]),
        )
        for name, m in model.named_modules()
    ]


def _stack_layer(singles: Sequence[nn.Module], rows: bool) -> tuple[nn.Module, list[Slot]]:
    first = singles[0]
    members = len(singles)
    if type(first) is nn.Linear:
        layer = BatchedLinear(
            members, first.in_features, first.out_features, first.bias is not None
        )
        return layer, [
            Slot(n, layer, n) for n in ("weight", "bias") if getattr(layer, n) is not None
        ]
    if type(first) is nn.Conv2d:
        conv = BatchedConv2d(first, members)
        return conv, [Slot(n, conv, n) for n in ("weight", "bias") if getattr(conv, n) is not None]
    if isinstance(first, _STATELESS) and not list(first.parameters()):
        if rows and isinstance(first, (nn.Sigmoid, nn.Tanh)):
            return MemberwiseActivation(copy.deepcopy(first), members), []
        return copy.deepcopy(first), []
    return stack_norm(singles, rows)


def _stack_block(
    singles: Sequence[HiddenBlock], prefix: str, rows: bool
) -> tuple[HiddenBlock, dict[str, Slot]]:
    slots: dict[str, Slot] = {}
    parts: dict[str, nn.Module | None] = {}
    for part in ("linear", "norm", "act"):
        members = [getattr(s, part, None) for s in singles]
        if members[0] is None:
            parts[part] = None
            continue
        layer, layer_slots = _stack_layer(members, rows)
        parts[part] = layer
        slots.update({f"{prefix}{part}.{s.name}": s for s in layer_slots})
    block = HiddenBlock(parts["linear"], parts["norm"], parts["act"], singles[0].norm_position)
    return block, slots


def _stack_blocks(
    blocks: Sequence[nn.ModuleList], prefix: str, rows: bool
) -> tuple[nn.ModuleList, dict[str, Slot]]:
    stacked, slots = [], {}
    for i, members in enumerate(zip(*blocks, strict=True)):
        block, block_slots = _stack_block(members, f"{prefix}.{i}.", rows)
        stacked.append(block)
        slots.update(block_slots)
    return nn.ModuleList(stacked), slots


def stack_models(singles: Sequence[nn.Module]) -> StackedModel:
    """The batched network of ``singles`` (networks of one shape and setting), holding
    each one's current values.

    Raises:
        NotBatchable: the networks differ in structure or settings, or one of their
            layers has no batched form; the message says which.
    """
    if not singles:
        raise ValueError("stack_models needs at least one network")
    first = singles[0]
    shape = _structure(first)
    for i, other in enumerate(singles[1:], start=1):
        if _structure(other) != shape:
            raise NotBatchable(f"member {i}'s network differs in shape or settings from member 0's")
    members = len(singles)
    if type(first) not in (MLP, CNN, VGG):
        raise NotBatchable(f"{type(first).__name__} networks have no batched form")
    head, head_slots = _stack_layer([s.head for s in singles], rows=True)
    slots = {f"head.{s.name}": s for s in head_slots}
    model: nn.Module
    if type(first) is MLP:
        hidden, block_slots = _stack_blocks([s.hidden for s in singles], "hidden", rows=True)
        model = BatchedMLP(hidden, head)
    elif type(first) is CNN:
        features, block_slots = _stack_blocks([s.features for s in singles], "features", rows=False)
        model = BatchedCNN(features, head, first.image_shape, first.pool, members)
    elif type(first) is VGG:
        features, block_slots = _stack_blocks([s.features for s in singles], "features", rows=False)
        model = BatchedVGG(features, first.pool_after, head, first.image_shape, members)
    else:
        raise NotBatchable(f"{type(first).__name__} networks have no batched form")
    slots.update(block_slots)
    device = next(first.parameters()).device
    model.to(device)
    named = [_named_tensors(s) for s in singles]
    missing = set(named[0]) - set(slots)
    if missing:
        raise NotBatchable(f"no batched place for {', '.join(sorted(missing))}")
    trainable = [frozenset(n for n, p in s.named_parameters() if p.requires_grad) for s in singles]
    stacked = StackedModel(model, members, slots, trainable)
    for name, slot in slots.items():
        if slot.shared and any(not torch.equal(t[name], named[0][name]) for t in named):
            raise NotBatchable(f"the members' {name} differ; they cannot share one")
    for k, single in enumerate(singles):
        stacked.copy_in(k, single)
    for name, slot in slots.items():
        if isinstance(slot.tensor, nn.Parameter):
            slot.tensor.requires_grad_(any(name in t for t in trainable))
    model.train(first.training)
    return stacked
