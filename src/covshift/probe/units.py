"""Which axis of a layer's values holds its units, found layer by layer.

A *unit* is a feature of a fully connected layer or a channel of a convolution: the
probe summarizes the values of each unit separately. Which axis of a captured tensor
holds the units depends on the layer, not on the model: in a ConvNeXt block the
depthwise convolution's values are ``(N, C, H, W)`` (units on axis 1) and the
LayerNorm and Linear layers after the permute see ``(N, H, W, C)`` (units last); a
transformer's values are ``(N, T, C)``, whose axis 1 holds token positions, not units.

With ``unit_dim="auto"`` (the probe's default) the axis of each record is found by the
first of these rules that applies; :class:`UnitAxis` says which one did (its
``source``) and why (its ``rule``):

1. ``"given"``: the user's ``unit_dim``: an int for every layer, or a mapping from
   module-name globs (:func:`~covshift.probe.select.glob_match`; the first pattern
   that matches wins) to an axis or ``"auto"``. What the user gives wins over what the
   layer says; when the two disagree the rule says so and the probe warns.
2. ``"layer"``: the layer's own feature count and where its definition puts it:

   - ``nn.Linear`` (``in_features`` / ``out_features``), ``nn.Bilinear``, transformers'
     ``Conv1D`` (``weight`` of shape ``(nx, nf)``), ``nn.Embedding`` (output),
     ``nn.MultiheadAttention`` (``embed_dim``): the last axis;
   - convolutions (``in_channels`` / ``out_channels``): axis 1;
   - norms: ``data_format`` (``"channels_first"`` / ``"channels_last"``, transformers'
     ConvNeXt), ``channel_dim`` or ``channels_last`` attributes when the layer has them;
     else ``num_features`` (BatchNorm, InstanceNorm) and ``num_channels`` (GroupNorm):
     axis 1; ``normalized_shape`` (LayerNorm, RMSNorm): its first normalized axis
     (the last for ``(C,)``), except for a class named ``...2d``/``...3d`` (timm's
     ``LayerNorm2d``, which permutes NCHW values itself): axis 1; a norm that has only
     a 1-D ``weight`` (a Llama RMSNorm): the one axis of that size; a norm wrapping one
     norm (``NoisyNorm``): the wrapped one's.

   The size of the tensor along that axis must equal the layer's count. If it does
   not, and exactly one other axis has that size, that axis is used (a channels-first
   norm that does not say so) and the probe warns; otherwise the layer's claim is
   dropped (and the probe warns) and the next rules decide.
3. ``"producer"``: a layer that says nothing (an activation, dropout, a custom module)
   takes the axis of the layer that produced its input tensor, directly or through
   modules that keep the shape (the ``Linear`` before a ``GELU``). With
   ``record="output"`` this needs the output to have the input's shape.
4. ``"only"``: values ``(N, F)`` have one axis after the batch axis: axis 1.
5. ``"assumed"``: the axis of the last layer before it, in this forward, whose output
   had the same shape (the ReLU after a ResNet's residual sum follows the BatchNorm
   before the sum); else axis 1, the default. The probe warns, once per layer.

The producer rules need the output of every module of the forward: while a record is
taken, a forward hook on every module notes the unit axis of its output (weak
references, so no tensor outlives the forward). The hooks are only attached when a
watched layer has no axis of its own and ``unit_dim`` leaves it to ``"auto"``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from covshift.probe.select import glob_match, is_norm

__all__ = [
    "UnitAxis",
    "UnitAxisError",
    "UnitAxisWarning",
    "UnitClaim",
    "UnitPolicy",
    "UnitTrace",
    "layer_claim",
    "resolve_unit_axis",
    "store_columns",
]

UnitDim = int | str | Mapping[str, int | str]

SOURCES = ("given", "layer", "producer", "only", "assumed")

# Axis 1 when nothing says otherwise: the channels of (N, C, ...), the probe's default
# before units were found per layer.
DEFAULT_AXIS = 1

_CHANNELS_FIRST_NAME = re.compile(r"[123]d$")


class UnitAxisError(ValueError):
    """A given unit axis does not exist in a layer's values (raised as is by the
    probe's forward, not taken for a probe batch that does not fit)."""


class UnitAxisWarning(UserWarning):
    """A layer's unit axis was assumed, or what the user gave contradicts the layer."""


@dataclass(frozen=True)
class UnitAxis:
    """The axis of a recorded tensor that holds the units, and how it was found.

    Attributes:
        dim: the axis, counted from 0 (the batch axis) in the recorded tensor.
        size: the number of units (the tensor's size along ``dim``).
        source: ``"given"``, ``"layer"``, ``"producer"``, ``"only"`` or ``"assumed"``
            (see :mod:`covshift.probe.units`).
        rule: why, in words (``"LayerNorm.normalized_shape=(768,): axis 2 (last) of
            (N, 7, 768)"``).
        doubt: why this axis may be wrong (an assumption, or a contradiction between
            the user's axis and the layer's); empty when there is none.
    """

    dim: int
    size: int
    source: str
    rule: str
    doubt: str = ""

    def __str__(self) -> str:
        return f"axis {self.dim} ({self.source}: {self.rule})"


@dataclass(frozen=True)
class UnitClaim:
    """What a layer says about the units of a tensor it takes or returns.

    Attributes:
        dim: where the layer's definition puts them (1: channels first; negative:
            from the end), or None: whichever axis has ``size`` entries.
        size: the layer's feature count (None: not known, not checked).
        text: the attribute it comes from (``"Linear.out_features=32"``).
    """

    dim: int | None
    size: int | None
    text: str
    # Whether a channels-first variant could hide behind the same attributes (a
    # subclass of LayerNorm with a forward of its own): noted when both ends fit.
    ambiguous_end: bool = False


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(["N", *(str(s) for s in shape[1:])]) + ")"


def _axis_text(dim: int, shape: Sequence[int]) -> str:
    last = " (last)" if dim == len(shape) - 1 and len(shape) > 2 else ""
    return f"axis {dim}{last} of {_shape_text(shape)}"


def store_columns(axis: UnitAxis | None) -> dict[str, Any]:
    """``Store.log_probe``'s keyword arguments for a record's unit axis."""
    if axis is None:
        return {}
    return {"unit_dim": axis.dim, "unit_source": axis.source, "unit_rule": axis.rule}


# -- what a layer says ------------------------------------------------------------------


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return None


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (tuple, list, torch.Size)) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(int(v) for v in value)
    return None


_TORCH_FORWARDS: tuple[Any, ...] = tuple(
    cls.forward for cls in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if cls is not None
)


def _own_forward_is_known(module: nn.Module) -> bool:
    """Whether the module computes torch's LayerNorm/RMSNorm or covshift's (so a
    normalized_shape of (C,) certainly means the last axis)."""
    forward = type(module).forward
    if forward in _TORCH_FORWARDS:
        return True
    try:
        from covshift.nn import layers
    except ImportError:  # pragma: no cover - covshift.nn is part of the package
        return False
    return forward in (layers.LayerNorm.forward, layers.RMSNorm.forward)


def _norm_claim(module: nn.Module) -> UnitClaim | None:
    cls = type(module).__name__
    count = None
    count_text = ""
    for attr in ("num_features", "num_channels"):
        n = _int(getattr(module, attr, None))
        if n is not None:
            count, count_text = n, f"{attr}={n}"
            break
    normalized = _shape(getattr(module, "normalized_shape", None))
    if count is None and normalized is not None:
        count, count_text = normalized[0], f"normalized_shape={normalized}"
    weight = getattr(module, "weight", None)
    if count is None and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        count, count_text = int(weight.shape[0]), f"weight of {int(weight.shape[0])}"

    # 1. The layer says where its channels are.
    data_format = getattr(module, "data_format", None)
    if isinstance(data_format, str) and count is not None:
        fmt = data_format.lower()
        if fmt in ("channels_first", "nchw", "ncl", "ncdhw"):
            return UnitClaim(1, count, f"{cls}(data_format={data_format!r}).{count_text}")
        if fmt in ("channels_last", "nhwc", "nlc", "ndhwc"):
            return UnitClaim(-1, count, f"{cls}(data_format={data_format!r}).{count_text}")
    channel_dim = _int(getattr(module, "channel_dim", None))
    if channel_dim is not None and channel_dim != 0:
        return UnitClaim(channel_dim, count, f"{cls}.channel_dim={channel_dim}, {count_text}")
    channels_last = getattr(module, "channels_last", None)
    if isinstance(channels_last, bool):
        dim = -1 if channels_last else 1
        return UnitClaim(dim, count, f"{cls}.channels_last={channels_last}, {count_text}")

    # 2. The kind of norm says it.
    if isinstance(module, nn.LocalResponseNorm):
        return UnitClaim(1, None, f"{cls} (across channels, axis 1)")
    named_nd = bool(_CHANNELS_FIRST_NAME.search(cls))
    if count is not None and (
        _int(getattr(module, "num_features", None)) is not None
        or _int(getattr(module, "num_channels", None)) is not None
    ):
        return UnitClaim(1, count, f"{cls}.{count_text}")
    if normalized is not None:
        if named_nd:  # timm's LayerNorm2d: NCHW values, permuted inside
            return UnitClaim(1, normalized[0], f"{cls}.{count_text}, channels first ({cls})")
        return UnitClaim(
            -len(normalized),
            normalized[0],
            f"{cls}.{count_text}",
            ambiguous_end=len(normalized) == 1 and not _own_forward_is_known(module),
        )
    if count is not None:  # only a weight: the axis of that size
        return UnitClaim(1 if named_nd else None, count, f"{cls}.{count_text}")

    # 3. A wrapper of one norm (covshift's NoisyNorm): the wrapped layer's.
    inner = [
        (name, claim)
        for name, child in module.named_children()
        if is_norm(child) and (claim := _norm_claim(child)) is not None
    ]
    if len(inner) == 1:
        name, claim = inner[0]
        return UnitClaim(claim.dim, claim.size, f"{cls} wraps {name!r}: {claim.text}")
    return None


def layer_claim(module: nn.Module, side: str) -> UnitClaim | None:
    """What ``module`` says about the units of its ``side`` (``"input"`` or
    ``"output"``) tensor, or None when it says nothing (activations, containers,
    custom modules)."""
    cls = type(module).__name__
    out = side == "output"
    weight = getattr(module, "weight", None)
    nf = _int(getattr(module, "nf", None))
    if nf is not None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        nx = int(weight.shape[0])
        if int(weight.shape[1]) == nf:  # transformers' Conv1D: y = x @ W + b, W (nx, nf)
            return (
                UnitClaim(-1, nf, f"{cls}.nf={nf}")
                if out
                else UnitClaim(-1, nx, f"{cls}.weight (nx={nx}, nf={nf})")
            )
    if isinstance(module, nn.Linear):
        n = module.out_features if out else module.in_features
        return UnitClaim(-1, n, f"{cls}.{'out' if out else 'in'}_features={n}")
    if isinstance(module, nn.Bilinear):
        n = module.out_features if out else module.in1_features
        return UnitClaim(-1, n, f"{cls}.{'out_features' if out else 'in1_features'}={n}")
    if isinstance(module, nn.modules.conv._ConvNd):
        n = module.out_channels if out else module.in_channels
        return UnitClaim(1, n, f"{cls}.{'out' if out else 'in'}_channels={n}")
    if isinstance(module, nn.Embedding):
        if not out:
            return None  # its input is indices
        return UnitClaim(-1, module.embedding_dim, f"{cls}.embedding_dim={module.embedding_dim}")
    if isinstance(module, nn.MultiheadAttention):
        return UnitClaim(-1, module.embed_dim, f"{cls}.embed_dim={module.embed_dim}")
    if is_norm(module):
        return _norm_claim(module)
    return None


def place_claim(claim: UnitClaim, shape: Sequence[int]) -> tuple[UnitAxis | None, str]:
    """The axis ``claim`` gives in a tensor of ``shape`` (checked against the layer's
    count), or None; and, when there is one, why it is in doubt."""
    ndim = len(shape)
    axes = range(1, ndim)
    if claim.dim is None:
        fits = [a for a in axes if shape[a] == claim.size]
        if len(fits) == 1:
            rule = f"{claim.text}: the axis of that size, {_axis_text(fits[0], shape)}"
            return UnitAxis(fits[0], shape[fits[0]], "layer", rule), ""
        what = "no axis" if not fits else f"axes {fits}"
        return None, f"{claim.text}: {what} of {_shape_text(shape)} has that size"
    wanted = claim.dim % ndim if -ndim <= claim.dim < ndim else None
    if wanted is not None and wanted != 0 and (claim.size is None or shape[wanted] == claim.size):
        doubt = ""
        rule = f"{claim.text}: {_axis_text(wanted, shape)}"
        if claim.ambiguous_end and ndim > 2 and wanted == ndim - 1 and shape[1] == shape[-1]:
            doubt = (
                f"axis 1 has the same size ({shape[1]}); a {claim.text.partition('.')[0]} "
                "that permutes channels-first values itself would have its units there"
            )
            rule += " (axis 1 has the same size; assumed channels last)"
        return UnitAxis(wanted, shape[wanted], "layer", rule, doubt), ""
    where = f"axis {wanted}" if wanted is not None else f"axis {claim.dim}"
    got = f"size {shape[wanted]}" if wanted is not None and wanted != 0 else "no such axis"
    fits = [a for a in axes if shape[a] == claim.size]
    if len(fits) == 1:
        rule = (
            f"{claim.text}: the layer's {where} of {_shape_text(shape)} has {got}; the only "
            f"axis of size {claim.size} is {fits[0]}: used"
        )
        return UnitAxis(fits[0], shape[fits[0]], "layer", rule, rule), ""
    return None, (
        f"{claim.text} does not fit {_shape_text(shape)} ({where} has {got}, "
        f"{'no other' if not fits else 'several'} axis of size {claim.size})"
    )


# -- what the user gives ----------------------------------------------------------------


def _check_axis(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where} must be an axis (an int such as 1 or -1) or 'auto', got "
            f"{type(value).__name__} {value!r}"
        )
    if value == 0:
        raise ValueError(f"{where} must not be 0 (the batch axis); use 1 or -1, or 'auto'")
    return int(value)


@dataclass(frozen=True)
class UnitPolicy:
    """The user's ``unit_dim``: one axis for every layer, ``"auto"``, or per-layer
    axes by module-name glob (first match wins; unmatched layers are ``"auto"``)."""

    everywhere: int | None = None  # an int for every layer; None: per pattern / auto
    patterns: tuple[tuple[str, int | None], ...] = ()  # (glob, axis or None: auto)

    @staticmethod
    def of(unit_dim: UnitDim) -> UnitPolicy:
        if isinstance(unit_dim, str):
            if unit_dim != "auto":
                raise ValueError(
                    f"unit_dim must be 'auto', an axis (1, -1, ...) or a mapping from "
                    f"layer-name patterns to axes, got {unit_dim!r}"
                )
            return UnitPolicy()
        if isinstance(unit_dim, Mapping):
            patterns = []
            for pattern, axis in unit_dim.items():
                if not isinstance(pattern, str) or not pattern:
                    raise TypeError(
                        f"unit_dim's keys must be layer-name patterns (strings), got {pattern!r}"
                    )
                where = f"unit_dim[{pattern!r}]"
                patterns.append((pattern, None if axis == "auto" else _check_axis(axis, where)))
            return UnitPolicy(None, tuple(patterns))
        return UnitPolicy(_check_axis(unit_dim, "unit_dim"))

    def given(self, name: str) -> tuple[int, str] | None:
        """The axis the user gives layer ``name`` and how (``"unit_dim=-1"``), or None
        (``"auto"``)."""
        if self.everywhere is not None:
            return self.everywhere, f"unit_dim={self.everywhere}"
        base = name.partition("#")[0]
        for pattern, axis in self.patterns:
            if glob_match(base, pattern):
                return None if axis is None else (axis, f"unit_dim[{pattern!r}]={axis}")
        return None

    def check_patterns(self, names: Sequence[str]) -> None:
        """Every pattern must match a watched layer (a typo would silently do nothing)."""
        for pattern, _ in self.patterns:
            if not any(glob_match(n, pattern) for n in names):
                raise ValueError(
                    f"unit_dim pattern {pattern!r} matches none of the watched layers "
                    f"({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
                )

    def needs_trace(self, modules: Mapping[str, nn.Module], record: str) -> bool:
        """Whether a watched layer may need what the forward shows: it says nothing
        itself (with a given axis: to check that axis against its producer's), or, left
        to ``"auto"``, its claim may not settle the axis."""
        for name, module in modules.items():
            claim = layer_claim(module, record)
            if claim is None:
                return True
            if self.given(name) is None and (claim.dim is None or claim.ambiguous_end):
                return True
        return False


# -- what the forward shows: producers of tensors ---------------------------------------


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


# -- the decision ---------------------------------------------------------------------


def resolve_unit_axis(
    name: str,
    module: nn.Module,
    value: torch.Tensor,
    side: str,
    policy: UnitPolicy,
    trace: UnitTrace | None = None,
    feed: torch.Tensor | None = None,
) -> UnitAxis:
    """The unit axis of ``value``, the ``side`` (``"input"``/``"output"``) tensor of
    layer ``name`` (see the module docstring for the rules).

    Args:
        name: the record key (``name#k`` for repeated calls).
        module: the layer.
        value: the recorded tensor ``(N, ...)``.
        side: ``"input"`` or ``"output"``.
        policy: the user's ``unit_dim``.
        trace: the producers of this forward's tensors (None: not traced).
        feed: the tensor the layer received (the undetached ``value`` itself for
            ``side="input"``), looked up in ``trace``.
    """
    shape = tuple(value.shape)
    ndim = len(shape)
    claim = layer_claim(module, side)
    own, problem = (None, "") if claim is None else place_claim(claim, shape)
    source = None
    if trace is not None and feed is not None and tuple(feed.shape) == shape:
        source = trace.lookup(feed)
        if source is not None and source.dim >= ndim:
            source = None
    given = policy.given(name)
    if given is not None:
        axis, how = given
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise UnitAxisError(
                f"probe: {how} does not fit the {side} of layer {name!r}, of shape "
                f"{tuple(shape)}: use an axis from 1 to {ndim - 1} (or -1 ... -{ndim - 1})"
                + (f"; the layer says {own}" if own is not None else "")
            )
        dim = axis % ndim
        rule = f"{how}: {_axis_text(dim, shape)}"
        doubt = ""
        if own is not None and own.dim != dim and own.doubt and shape[dim] == own.size:
            rule += f"; the layer alone is ambiguous ({own.rule})"
        elif own is not None and own.dim != dim:
            doubt = f"{how} gives axis {dim}, but {own.rule}"
            rule += f"; the layer says otherwise ({own.rule})"
        elif own is None and claim is None and source is not None and source.dim != dim:
            said = f"{source.origin!r}, which produced its input, has its units on axis "
            said += f"{source.dim} ({source.text})"
            doubt = f"{how} gives axis {dim}, but {said}"
            rule += f"; but {said}"
        elif own is None and problem:
            rule += f"; {problem}"
        return UnitAxis(dim, shape[dim], "given", rule, doubt)
    if own is not None:
        return own
    note = f" ({problem})" if problem else ""
    if source is not None:
        rule = (
            f"follows {source.origin!r}, which produced its input ({source.text}): "
            f"{_axis_text(source.dim, shape)}{note}"
        )
        return UnitAxis(source.dim, shape[source.dim], "producer", rule, problem)
    if ndim == 2:
        return UnitAxis(1, shape[1], "only", f"the one axis after the batch axis{note}", problem)
    if trace is not None:
        near = trace.nearest(shape)
        if near is not None:
            rule = (
                f"as {near.origin!r} ({near.text}), the last layer before it with an "
                f"output of this shape: {_axis_text(near.dim, shape)}{note}"
            )
            return UnitAxis(near.dim, shape[near.dim], "assumed", rule, f"assumed {rule}")
    rule = f"the default, {_axis_text(DEFAULT_AXIS, shape)}; nothing before it says{note}"
    return UnitAxis(DEFAULT_AXIS, shape[DEFAULT_AXIS], "assumed", rule, f"assumed {rule}")
