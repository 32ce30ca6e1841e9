"""Which BatchNorm consumes which Linear/Conv's output, alone: the pairs that can fold.

The first source that works decides: the torch.fx graph, else a forward trace on
``check_input`` (each fold then verified on it), else ``nn.Sequential`` order and, with
``by_name``, sibling names (``conv1``/``bn1``).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["LAYER_TYPES", "Pair", "Pairing", "find_pairs"]

_LAYER_NAME = re.compile(r"(conv|fc|linear)(.*)")
_NORM_PREFIXES = ("bn", "norm")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Pair:
    """A norm (dotted path) applied to a layer's output, and how that was found."""

    layer: str
    norm: str
    source: str  # "graph", "trace", "sequential" or "name"


@dataclass
class Pairing:
    """The pairs found, why each other norm was not paired, and how they were found."""

    pairs: list[Pair] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # norm path -> why not paired
    method: str = ""


class _LeafTracer(fx.Tracer):
    """Keeps norms and Linear/Conv layers (subclasses too) as single calls."""

    def __init__(self, is_norm: object) -> None:
        super().__init__()
        self._is_norm = is_norm

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._is_norm(m) or isinstance(m, LAYER_TYPES):  # type: ignore[operator]
            return True
        return super().is_leaf_module(m, qualname)


def _describe(node: object) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({type(node).__name__})"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)}()"
    return f"{node.op} {node.target}"


def _from_graph(model: nn.Module, is_norm: object) -> Pairing | str:
    """Pairs from the fx graph, or why the model could not be traced."""
    tracer = _LeafTracer(is_norm)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first[:160]}"
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    found = Pairing(method="the traced graph (torch.fx)")
    for node in graph.nodes:
        if node.op != "call_module" or not is_norm(model.get_submodule(node.target)):  # type: ignore[operator]
            continue
        name = str(node.target)
        source = node.args[0] if node.args else None
        layer_name = str(source.target) if isinstance(source, fx.Node) else ""
        if len(node.args) != 1 or node.kwargs:
            found.reasons[name] = "called with more than its input"
        elif not (isinstance(source, fx.Node) and source.op == "call_module"):
            found.reasons[name] = f"its input comes from {_describe(source)}"
        elif len(source.users) != 1:
            users = ", ".join(_describe(u) for u in source.users if u is not node)
            found.reasons[name] = f"the output of {layer_name} is also used by {users}"
        elif calls[name] > 1 or calls[layer_name] > 1:
            found.reasons[name] = f"{name} or {layer_name} is called more than once"
        else:
            found.pairs.append(Pair(layer_name, name, "graph"))
    return found


def _from_trace(model: nn.Module, is_norm: object, example: Tensor) -> Pairing:
    """Pairs from one eval forward on ``example`` with hooks (see the module doc)."""
    outputs: dict[int, tuple[str, Tensor]] = {}
    fed: dict[str, str | None] = {}
    calls: Counter[str] = Counter()
    handles = []

    names = {id(m): name for name, m in model.named_modules()}

    def after_layer(m: nn.Module, args: object, out: object) -> None:
        calls[names[id(m)]] += 1
        if isinstance(out, Tensor):  # the tensor is kept, so its id stays unique
            outputs[id(out)] = (names[id(m)], out)

    def before_norm(m: nn.Module, args: tuple) -> None:
        name = names[id(m)]
        calls[name] += 1
        x = args[0] if args else None
        hit = outputs.get(id(x)) if isinstance(x, Tensor) else None
        fed[name] = hit[0] if hit is not None and hit[1] is x else None

    for m in model.modules():
        if is_norm(m):  # type: ignore[operator]
            handles.append(m.register_forward_pre_hook(before_norm))
        elif isinstance(m, LAYER_TYPES):
            handles.append(m.register_forward_hook(after_layer))
    try:
        _eval_output(model, example)
    finally:
        for h in handles:
            h.remove()
    found = Pairing(method="a forward trace on check_input")
    for name, layer in fed.items():
        if layer is None:
            found.reasons[name] = "its input is not the output of a Linear/Conv module"
        elif calls[name] > 1 or calls[layer] > 1:
            found.reasons[name] = f"{name} or {layer} is called more than once"
        else:
            found.pairs.append(Pair(layer, name, "trace"))
    return found


def _from_names(model: nn.Module, is_norm: object, by_name: bool) -> list[Pair]:
    pairs = []
    for parent_path, parent in model.named_modules():
        prefix = f"{parent_path}." if parent_path else ""
        names = [name for name, _ in parent.named_children()]
        candidates = []
        if isinstance(parent, nn.Sequential):
            candidates = [(a, b, "sequential") for a, b in itertools.pairwise(names)]
        elif by_name:
            for name in names:
                if match := _LAYER_NAME.fullmatch(name):
                    norms = [p + match[2] for p in _NORM_PREFIXES if p + match[2] in names]
                    candidates += [(name, norm, "name") for norm in norms]
        for layer, norm, source in candidates:
            if is_norm(getattr(parent, norm)):  # type: ignore[operator]
                pairs.append(Pair(prefix + layer, prefix + norm, source))
    return pairs


@torch.no_grad()
def _eval_output(module: nn.Module, x: Tensor) -> Any:
    """``module(x)`` in eval mode without gradients, the module's mode restored."""
    was_training = module.training
    try:
        return module.eval()(x)
    finally:
        module.train(was_training)


def find_pairs(
    model: nn.Module, is_norm: object, *, check_input: Tensor | None, by_name: bool
) -> Pairing:
    """The (layer, norm) pairs of ``model`` whose norm ``is_norm`` (a predicate on a
    module) accepts, by the first source that works (see the module docstring)."""
    traced = _from_graph(model, is_norm)
    if isinstance(traced, Pairing):
        return traced
    if check_input is not None:
        found = _from_trace(model, is_norm, check_input)
        found.method += f" (torch.fx could not trace the model: {traced})"
        return found
    how = "Sequential order" + (" and names" if by_name else "")
    return Pairing(
        _from_names(model, is_norm, by_name),
        method=f"{how} (torch.fx could not trace the model: {traced}; pass check_input "
        "to pair by a forward trace)",
    )
