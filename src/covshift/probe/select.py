"""Which modules a probe watches: by name pattern, by type, or automatically.

A layer specification is a string or a module type, or a list of them:

- ``"hidden.*.act"``: a glob over module names, case-sensitive, in which ``*`` and
  ``?`` stay within one part of the dotted name (``blocks.*`` is ``blocks.0``, not
  ``blocks.0.mlp``) and ``**`` spans any number of parts (``blocks.**.act``);
  ``[abc]`` is a character class;
- ``nn.ReLU``: every module that is an instance of the type;
- ``"auto"``: every normalization layer and every activation (``"auto:norm"`` and
  ``"auto:act"`` separately), the places where shift is usually discussed; an
  activation is one of torch.nn's or any childless module whose class name says it is
  one (transformers' ``NewGELUActivation``, timm's ``GELUTanh``/``Swish``, ...);
- ``"auto:linear"``: every Linear and Conv (``nn.Linear``, ``nn.Conv{1,2,3}d`` and the
  transposed convolutions, subclasses included, and transformers' ``Conv1D``, the
  Linear of GPT-2 with a weight of shape ``(nx, nf)``).

A name pattern or a type that matches nothing is an error that lists what the model
has. Explicitly named modules must be called by the forward (else the record is an
error); modules picked by type or ``auto`` that the forward never calls (e.g. the
``out_proj`` that ``nn.MultiheadAttention`` uses without calling) are skipped. A
module inside another selected by ``auto`` (the BatchNorm inside a wrapper norm) is
left to its container, which sees the same input.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from covshift.nn import registry

__all__ = [
    "AUTO_MODES",
    "Selection",
    "glob_match",
    "is_activation",
    "is_linear",
    "is_norm",
    "select_layers",
]

LayerSpec = str | type[nn.Module]

# torch.nn's norm classes, from covshift.nn's registry of norm kinds, and LocalResponseNorm.
_NORM_TYPES: tuple[type[nn.Module], ...] = (*registry.torch_classes(), nn.LocalResponseNorm)
# Norms from other libraries (covshift.nn, timm, user code) are recognized by name.
_NORM_NAME = re.compile(r"(Norm|Renorm|Normalization)(\d+d)?$")

_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Threshold,
)

_LINEAR_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

AUTO_MODES = ("auto", "auto:norm", "auto:act", "auto:linear")


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch.nn's, a kind of covshift.nn's registry (Dynamic
    Tanh among them), or any class named ``...Norm[Nd]``."""
    return (
        isinstance(module, _NORM_TYPES)
        or bool(_NORM_NAME.search(type(module).__name__))
        or registry.match(type(module)) is not None
    )


# Class names of activations in other libraries: transformers' GELUActivation,
# NewGELUActivation, QuickGELUActivation, ClippedGELUActivation, ...; timm's Swish,
# GELUTanh, HardSwishMe, QuickGELU, ...; a user's MyReLU.
_ACTIVATION_NAME = re.compile(
    r"(ReLU\d*|GELU|GeLU|Gelu|SiLU|Swish|Mish|Sigmoid|Tanh|ELU|Softplus|Softsign"
    r"|HardSwish|Hardswish|HardSigmoid|Hardsigmoid|Activation)(Tanh|Me|Jit|Fast|Approx)?$"
)


def is_activation(module: nn.Module) -> bool:
    """An elementwise activation: torch.nn's (not Softmax, not attention), or a module
    without children whose class name ends like one (``...GELU``, ``...Activation``,
    ``Swish``, ...) and that is not a norm."""
    if isinstance(module, _ACTIVATION_TYPES):
        return True
    if is_norm(module) or any(True for _ in module.children()):
        return False
    return bool(_ACTIVATION_NAME.search(type(module).__name__))


@functools.cache
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a module-name glob: ``*`` and ``?`` within one dotted
    part, ``**`` across parts (also zero of them: ``a.**.b`` matches ``a.b``)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith(".**.", i):
            out.append(r"(?:\..*)?\.")
            i += 4
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append(r"[^.]*")
            i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            chars = body[negate:].replace("\\", "\\\\").replace("[", "\\[")
            if chars.startswith("^"):
                chars = "\\" + chars
            out.append("[" + ("^" if negate else "") + chars + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def glob_match(name: str, pattern: str) -> bool:
    """Whether module name ``name`` matches ``pattern`` (see :func:`glob_regex`)."""
    return glob_regex(pattern).fullmatch(name) is not None


def is_linear(module: nn.Module) -> bool:
    """A Linear, Bilinear or (transposed) convolution, subclasses included, or a
    Linear with a transposed weight like transformers' ``Conv1D`` (an int ``nf`` and a
    weight of shape ``(nx, nf)``)."""
    if isinstance(module, _LINEAR_TYPES):
        return True
    nf, weight = getattr(module, "nf", None), getattr(module, "weight", None)
    return (
        isinstance(nf, int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == nf
    )


@dataclass(frozen=True)
class Selection:
    """Chosen modules by name (in the model's registration order); ``optional`` names
    were picked by type or ``auto`` and are skipped if the forward never calls them."""

    modules: dict[str, nn.Module]
    optional: frozenset[str]


def _auto(named: dict[str, nn.Module], mode: str) -> list[str]:
    want_norm = mode in ("auto", "auto:norm")
    want_act = mode in ("auto", "auto:act")
    hits: list[str] = []
    for name, module in named.items():
        if not name:
            continue
        if mode == "auto:linear":
            keep = is_linear(module)
        else:
            keep = (want_norm and is_norm(module)) or (want_act and is_activation(module))
        # A module inside a selected one (a wrapper norm's inner BatchNorm) sees the
        # same input as its container: keep the outermost.
        if keep and not any(name.startswith(h + ".") for h in hits):
            hits.append(name)
    return hits


def _describe(model: nn.Module, named: dict[str, nn.Module]) -> str:
    sample = ", ".join(n for n in list(named)[1:13])
    return f"module names of {type(model).__name__} look like: {sample}"


def select_layers(model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]) -> Selection:
    """Resolve a layer specification (see the module docstring) against ``model``."""
    specs: Sequence[LayerSpec] = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not specs:
        raise ValueError(
            "layers must name at least one module: a glob like 'hidden.*.act', a type "
            "like nn.ReLU, or 'auto' / 'auto:norm' / 'auto:act' / 'auto:linear'"
        )
    named = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    optional: set[str] = set()
    for spec in specs:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [n for n, m in named.items() if n and isinstance(m, spec)]
            if not hits:
                types = sorted({type(m).__name__ for m in named.values()})
                raise ValueError(
                    f"layer type {spec.__name__} matches no module of {type(model).__name__}; "
                    f"its module types are: {', '.join(types)}"
                )
            optional.update(h for h in hits if h not in chosen)
        elif isinstance(spec, str) and spec.startswith("auto"):
            if spec not in AUTO_MODES:
                raise ValueError(f"layers: unknown mode {spec!r}; use one of {AUTO_MODES}")
            hits = _auto(named, spec)
            if not hits:
                raise ValueError(
                    f"layers={spec!r} found no {spec.partition(':')[2] or 'norm or activation'} "
                    f"module in {type(model).__name__}; {_describe(model, named)}"
                )
            optional.update(h for h in hits if h not in chosen)
        elif isinstance(spec, str):
            hits = [n for n in named if n and glob_match(n, spec)]
            if not hits:
                deeper = "**".join(spec.split("*")) if "*" in spec and "**" not in spec else None
                hint = (
                    f" ('*' stays within one dotted part; {deeper!r} would span parts)"
                    if deeper and any(glob_match(n, deeper) for n in named if n)
                    else ""
                )
                raise ValueError(
                    f"layer pattern {spec!r} matches no module of {type(model).__name__}"
                    f"{hint}; {_describe(model, named)}"
                )
            optional.difference_update(hits)  # named explicitly: must be called
        else:
            raise TypeError(
                "layers must be glob strings, nn.Module types or 'auto' modes, got "
                f"{type(spec).__name__} {spec!r}"
            )
        for name in hits:
            chosen.setdefault(name, named[name])
    order = {name: i for i, name in enumerate(named)}
    ordered = dict(sorted(chosen.items(), key=lambda item: order[item[0]]))
    return Selection(ordered, frozenset(optional))
