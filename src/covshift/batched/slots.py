"""Where each member's values live in a batched layer: :class:`Slot`.

A batched tensor holds the ``K`` members' copies of one parameter or buffer one after
another along its first dim (``(K, out, in)`` for a Linear, ``(K*C,)`` for a norm's
channels, ``(K*C_out, C_in, kh, kw)`` for a conv), so member ``k``'s values are the
``k``-th block of ``tensor.view(K, -1)``, a view that reads and writes in place. A
step counter that every member shares (BatchNorm's ``num_batches_tracked``: the members
train in lockstep) is one *shared* tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["NotBatchable", "Slot"]


class NotBatchable(ValueError):
    """The members cannot be trained as one batched model (a layer kind the batched
    path does not have, or members whose networks differ in shape or settings); the
    message says what, and the members train one at a time instead."""


@dataclass(frozen=True)
class Slot:
    """One parameter or buffer of a batched layer, as the members' own.

    Attributes:
        name: the member's name for it, relative to the member's layer (``weight``,
            ``running_mean``, ``norm.weight`` for a noisy norm's inner BatchNorm).
        module: the batched module that holds it.
        attr: its attribute name there.
        shared: one value for all members (a step counter), not one block each.
    """

    name: str
    module: nn.Module
    attr: str
    shared: bool = False

    @property
    def tensor(self) -> Tensor:
        return getattr(self.module, self.attr)

    def member(self, k: int, members: int) -> Tensor:
        """Member ``k``'s values: a view of the batched tensor (flat; reshape it to the
        member's shape)."""
        tensor = self.tensor
        return tensor if self.shared else tensor.view(members, -1)[k]

    def renamed(self, prefix: str) -> Slot:
        return Slot(f"{prefix}{self.name}", self.module, self.attr, self.shared)
