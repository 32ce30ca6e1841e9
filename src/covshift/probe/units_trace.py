"""What the forward shows: the unit axis of every module's output, by tensor.

The producer rules of :mod:`covshift.probe.units` (``"producer"``, ``"assumed"``)
need to know which module made the tensor a layer receives. While a record is taken, a
forward hook on every module (:class:`~covshift.probe.hooks.Taps`, ``on_output``)
hands each output to :meth:`UnitTrace.on_output`, which notes its unit axis by the
tensor's identity, held by weak reference so that no tensor outlives the forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from covshift.probe.units_declared import UnitClaim, layer_claim, place_claim

__all__ = ["UnitTrace"]


@dataclass(frozen=True)
class _Traced:
    ref: weakref.ref[torch.Tensor]
    origin: str  # the module whose claim gave the axis
    text: str  # its claim
    dim: int


class UnitTrace:
    """The unit axes of the tensors that modules return during one forward, by
    identity (weak references), and the last known axis per tensor shape."""

    def __init__(self) -> None:
        self._by_id: dict[int, _Traced] = {}
        self._by_shape: dict[tuple[int, ...], _Traced] = {}
        self._claims: dict[int, tuple[nn.Module, UnitClaim | None]] = {}

    def clear(self) -> None:
        self._by_id.clear()
        self._by_shape.clear()

    def _claim(self, module: nn.Module) -> UnitClaim | None:
        found = self._claims.get(id(module))
        if found is None or found[0] is not module:
            found = (module, layer_claim(module, "output"))
            self._claims[id(module)] = found
        return found[1]

    def lookup(self, tensor: torch.Tensor | None) -> _Traced | None:
        """What produced ``tensor`` in this forward (None: not a traced output)."""
        if tensor is None:
            return None
        found = self._by_id.get(id(tensor))
        if found is None or found.ref() is not tensor:
            return None
        return found

    def nearest(self, shape: tuple[int, ...]) -> _Traced | None:
        """The last traced output of ``shape``."""
        return self._by_shape.get(shape)

    def on_output(
        self, name: str, module: nn.Module, feed: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        """Note the unit axis of ``out``, which ``module`` (named ``name``) returned."""
        if out.dim() < 2 or self.lookup(out) is not None:
            return  # a container returning its last child's tensor: already known
        shape = tuple(out.shape)
        claim = self._claim(module)
        traced = None
        if claim is not None:
            axis, _ = place_claim(claim, shape)
            if axis is not None:
                traced = _Traced(weakref.ref(out), name, claim.text, axis.dim)
        elif next(module.children(), None) is None:  # a leaf that keeps the shape
            source = self.lookup(feed)
            if source is not None and feed is not None and tuple(feed.shape) == shape:
                traced = _Traced(weakref.ref(out), source.origin, source.text, source.dim)
        if traced is not None:
            self._by_id[id(out)] = traced
            self._by_shape[shape] = traced
