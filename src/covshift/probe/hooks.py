"""Hook mechanics: when values are captured, and what a module's input or output is.

:class:`Taps` puts forward hooks on the chosen modules for the span of ONE model
forward and hands every captured tensor, detached, to a callback; the callback
summarizes it at once (:mod:`covshift.probe.record_summary`), so no activation outlives
its hook. The taps never keep a tensor across forwards.

- *Which tensor*: for ``record="input"``, the first tensor among the positional then
  the keyword arguments (the query of ``nn.MultiheadAttention``); for
  ``record="output"``, the output, or its first tensor when the output is a tuple,
  list or dict (``nn.MultiheadAttention`` returns ``(attn_output, attn_weights)``: the
  attention output is recorded).
- *Modules called several times in one forward* (shared weights) are recorded once
  per call: the first call under the module's name, later ones as ``name#1``,
  ``name#2``, ... so that no call's distribution is mixed with another's.
- *Which activation an output feeds*: with ``record="output"``, a tensor that a chosen
  module returned and that an activation module then receives unchanged is reported
  to ``on_feeds`` (the saturation of that activation's inputs).
- *What made each tensor* (``on_output``): with it, a forward hook on every module of
  the model reports each module's output tensor (undetached, with the tensor the module
  received), so that the unit axis of a layer that says nothing (an activation) can
  follow the layer that produced its input (:mod:`covshift.probe.units`).
- *Live forwards* (``gated=True``): a hook on the model itself opens the capture only
  for a forward run in training mode with gradients enabled (a training step, not an
  evaluation) and closes it when that forward returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from covshift.probe.select import is_activation

__all__ = ["Taps", "first_tensor"]

ValueCallback = Callable[[str, nn.Module, torch.Tensor, "torch.Tensor | None"], None]
FeedsCallback = Callable[[str, nn.Module, torch.Tensor], None]
OutputCallback = Callable[[str, nn.Module, "torch.Tensor | None", torch.Tensor], None]


def first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` if it is a tensor, else the first tensor found depth-first inside a
    tuple, list or dict; None if there is none."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class Taps:
    """Forward hooks on ``modules`` of ``model`` that live for one forward.

    Args:
        model: the root module (the one whose forward is run).
        modules: name -> module to capture.
        record: ``"input"`` or ``"output"``.
        on_value: ``(key, module, value, feed)`` for every call of a chosen module;
            ``key`` is the name, with ``#k`` for the k-th repeated call; ``value`` is
            detached; ``feed`` is the tensor the module received, undetached (the very
            object its producer returned; ``value``'s origin with ``record="input"``).
        on_feeds: ``(key, activation, value)`` when an output captured under ``key``
            enters ``activation`` unchanged (``record="output"`` only).
        on_output: ``(name, module, feed, output)`` for every module of ``model`` that
            returns a tensor, undetached (None: no such hooks).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        record: str,
        on_value: ValueCallback,
        on_feeds: FeedsCallback | None = None,
        on_output: OutputCallback | None = None,
    ) -> None:
        self.model = model
        self.modules = modules
        self.record = record
        self.on_value = on_value
        self.on_feeds = on_feeds
        self.on_output = on_output
        self.calls: dict[str, int] = {}
        self.active = False  # whether the current forward is being captured
        self.done = False  # a gated capture has seen its forward
        self._handles: list[RemovableHandle] = []
        self._outputs: dict[int, tuple[str, torch.Tensor]] = {}
        self._on_forward_end: Callable[[], None] | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(
        self, *, gated: bool = False, on_forward_end: Callable[[], None] | None = None
    ) -> None:
        """Register the hooks. Ungated: capture from now until :meth:`remove`. Gated:
        capture the next training forward of the model only."""
        self.remove()
        self.calls.clear()
        self.done = False
        self.active = not gated
        self._on_forward_end = on_forward_end
        for name, module in self.modules.items():
            hook = self._capture(name)
            if self.record == "input":
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = module.register_forward_hook(hook, with_kwargs=True)
            self._handles.append(handle)
        if self.on_output is not None:
            for name, module in self.model.named_modules():
                handle = module.register_forward_hook(self._traced(name), with_kwargs=True)
                self._handles.append(handle)
        if self.record == "output" and self.on_feeds is not None:
            for module in self.model.modules():
                if is_activation(module):
                    handle = module.register_forward_pre_hook(self._feeds, with_kwargs=True)
                    self._handles.append(handle)
        if gated:
            self._handles.append(self.model.register_forward_pre_hook(self._open))
            self._handles.append(self.model.register_forward_hook(self._close))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()
        self.active = False

    # -- hooks ---------------------------------------------------------------
    def _open(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # A training step runs in training mode with autograd on; an evaluation in
        # between (eval mode or no_grad) must not be mistaken for it.
        if not self.done:
            self.active = module.training and torch.is_grad_enabled()

    def _close(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self.active:
            return
        self.active = False
        self.done = True
        self._outputs.clear()
        if self._on_forward_end is not None:
            self._on_forward_end()

    def _capture(self, name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *out: Any
        ) -> None:
            if not self.active:
                return
            feed = first_tensor(args)
            if feed is None:
                feed = first_tensor(kwargs)
            value = feed if self.record == "input" else first_tensor(out[0])
            if value is None:
                raise TypeError(
                    f"probe: the {self.record} of layer {name!r} contains no tensor "
                    f"({type(out[0] if out else args).__name__}); probe another layer or "
                    f"record='{'output' if self.record == 'input' else 'input'}'"
                )
            calls = self.calls.get(name, 0)
            self.calls[name] = calls + 1
            key = name if calls == 0 else f"{name}#{calls}"
            with torch.no_grad():
                self.on_value(key, module, value.detach(), feed)
            if self.record == "output" and self.on_feeds is not None:
                # Keep the tensor (not a copy) until its consumer is known, so that its
                # id cannot be reused; cleared when the forward ends.
                self._outputs[id(value)] = (key, value)

        return hook

    def _traced(self, name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not self.active or self.on_output is None:
                return
            out = first_tensor(output)
            if out is not None:
                feed = first_tensor(args)
                self.on_output(
                    name, module, feed if feed is not None else first_tensor(kwargs), out
                )

        return hook

    def _feeds(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.active or self.on_feeds is None:
            return
        value = first_tensor(args)
        found = self._outputs.pop(id(value), None) if value is not None else None
        if found is not None and found[1] is value:
            with torch.no_grad():
                self.on_feeds(found[0], module, value.detach())
