"""Swap the normalization layers inside any model: ``convert(model, to=...)``, carrying
the state that fits (:mod:`.convert_carry`) and reporting, never silently losing, the
rest (:func:`convert_with_report`, docs/nn.md).

Example: ``convert(net, to="group", num_groups=32)`` puts GroupNorm(32, C) for every
BatchNorm; ``convert(net, to="covshift")`` the same kinds in covshift's implementation.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Literal

from torch import nn

from covshift.nn import convert_carry as carry
from covshift.nn import registry
from covshift.nn.convert_carry import ConversionEntry, ConversionReport, ConversionWarning
from covshift.nn.noise import NoisyNorm
from covshift.nn.registry import create_norm

__all__ = [
    "ConversionEntry",
    "ConversionReport",
    "ConversionWarning",
    "convert",
    "convert_with_report",
]

# --- Building a replacement: a registry name, "torch"/"covshift", a class or a factory

Target = str | type | Callable[..., nn.Module]


def _trailing(kind: str) -> bool:
    """Whether ``kind``'s statistics run over the trailing dims (not over dim 1)."""
    return registry.get_kind(kind).trailing


def _num_features(m: nn.Module, kind: str) -> int:
    """The channel count of ``m``, which the target is built for."""
    if kind == "group":
        return int(m.num_channels)
    if _trailing(kind):
        # (C,) for features last; (C, H, W) for a LayerNorm over a whole NCHW sample.
        return int(m.normalized_shape[0])
    return int(m.num_features)


def _dims(m: nn.Module, kind: str, dims: int | None) -> int | None:
    """The input rank of ``m``: ``dims`` (its class's), or for a SyncBatchNorm, whose
    class has none, that of its ``original_class`` (the class it was converted from)."""
    if dims is None and kind == "sync_batch":
        original = getattr(m, "original_class", None)
        found = None if original is None else registry.match(original)
        dims = None if found is None else found.dims
    return dims


def _same_kind_args(m: nn.Module, cls: type) -> dict[str, object]:
    """The arguments of ``cls`` that rebuild ``m``'s configuration: each constructor
    parameter ``m`` holds as an attribute (torch's names), and whether it has a bias."""
    params = inspect.signature(cls).parameters
    skip = ("bias", "device", "dtype")
    args = {n: getattr(m, n) for n in params if n not in skip and hasattr(m, n)}
    if "bias" in params:
        args["bias"] = getattr(m, "bias", None) is not None
    return args


def _params(f: Callable) -> list[str]:
    try:
        return list(inspect.signature(f).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return []


def _build_for_class(cls: type, channels: int, source: nn.Module, kind: str, kw: dict) -> nn.Module:
    """``cls(channels, **kw)``, or ``cls(num_groups, channels, **kw)`` for GroupNorm-like
    classes (whose first constructor parameter is ``num_groups``)."""
    kw, params = dict(kw), _params(cls)
    if params and params[0] == "num_groups":
        groups = kw.pop("num_groups", source.num_groups if kind == "group" else None)
        if groups is None:
            raise ValueError(
                f"to={cls.__name__} needs the number of groups: pass num_groups=..., e.g. "
                f"convert(model, to={cls.__name__}, num_groups=32)"
            )
        return cls(groups, channels, **kw)
    return cls(channels, **kw)


def _build(
    target: Target,
    m: nn.Module,
    kind: str,
    base_dims: int | None,
    dims: int | None,
    kw: dict,
    notes: list[str],
) -> nn.Module | None:
    """What ``m`` (of ``kind``, its registered class's rank ``base_dims``) becomes:
    ``target`` built for its channels (and input rank ``dims``); None where ``"torch"``
    or ``"covshift"`` has no class of that kind and rank (Batch Renorm, Ghost BN)."""
    channels = _num_features(m, kind)
    if isinstance(target, str) and target in ("torch", "covshift"):
        entry = registry.get_kind(kind)
        cls = (entry.torch_classes if target == "torch" else entry.classes).get(base_dims)
        if cls is None:
            return None
        new = cls(**{**_same_kind_args(m, cls), **kw})
        if kind == "sync_batch" and hasattr(new, "original_class"):
            new.original_class = getattr(m, "original_class", None)
        return new
    if isinstance(target, str):
        if dims is None:
            dims = 1 if _trailing(kind) else 2
            notes.append(
                f"input rank unknown for {type(m).__name__}; assumed dims={dims} "
                "(pass dims=... to choose)"
            )
        return create_norm(target, channels, dims=dims, **kw)
    if isinstance(target, type):
        return _build_for_class(target, channels, m, kind, kw)
    if callable(target):
        takes_dims = "dims" in _params(target)
        return target(channels, dims=dims, **kw) if takes_dims else target(channels, **kw)
    raise TypeError(
        f"to must be a registry name, 'torch', 'covshift', a class, a factory or a "
        f"mapping of those; got {target!r}"
    )


# --- The entry points


def _resolve_target(to: Target | Mapping, m: nn.Module, kind: str) -> Target | None:
    """What ``m`` becomes, or None to leave it (no mapping key matches, or it already
    is in the library that ``"torch"``/``"covshift"`` asks for)."""
    if isinstance(to, Mapping):
        key = next((k for k in to if k == kind or (isinstance(k, type) and isinstance(m, k))), None)
        if key is None:
            return None
        to = to[key]
    if isinstance(to, str) and to in ("torch", "covshift"):
        # Anything not defined in covshift (torch.nn's, timm's subclasses) is "torch".
        if (type(m).__module__.split(".")[0] == "covshift") == (to == "covshift"):
            return None
    return to


def convert_with_report(
    model: nn.Module,
    to: Target | Mapping[type | str, Target],
    *,
    dims: int | None = None,
    **kw: object,
) -> tuple[nn.Module, ConversionReport]:
    """Replace every normalization layer of ``model``; return ``(model, report)``.

    Args:
        model: any module, changed in place (a norm itself: its replacement is returned).
        to: what to put in place of each norm layer:

            - ``"torch"`` / ``"covshift"``: the same kind and configuration in the
              other implementation (covshift.nn.BatchNorm2d <-> torch.nn.BatchNorm2d);
              every state carries over, outputs are unchanged;
            - a registry name (``"batch"``, ``"group"``, ``"batch_renorm"``, ... see
              :func:`covshift.nn.norm_names`): ``create_norm(name, C, dims=..., **kw)``;
            - a class: ``cls(C, **kw)``, or ``cls(num_groups, C, **kw)`` when its first
              parameter is ``num_groups`` (GroupNorm);
            - a factory: ``factory(C, **kw)`` (plus ``dims=`` if it takes it);
            - a mapping from source classes (isinstance) or kinds (``"batch"``,
              ``"layer"``, ...) to any of the above; layers matching no key stay.
        dims: the input's spatial rank (1, 2, 3) for targets that depend on it; by
            default the source's (BatchNorm2d: 2), else a guess the report notes.
        **kw: passed to every target constructor (e.g. ``num_groups=32``, ``eps=``).

    Subclasses (timm's) are matched too, their extra parameters or buffers reported as
    dropped; one with its own ``forward`` or child modules (timm's BatchNormAct2d) stays,
    reported as skipped. A module shared by several parents is converted once.
    """
    report = ConversionReport()

    def swap(m: nn.Module, path: str) -> nn.Module | None:
        found = registry.match(type(m))
        target = None if found is None else _resolve_target(to, m, found.kind)
        if found is None or target is None:
            return None  # not converted: its children may be
        kind = found.kind
        entry = ConversionEntry(path, type(m).__name__, "")
        report.entries.append(entry)
        own = registry.own_behaviour(m)
        if own is not None:
            # A behaviour (a fused activation, a permutation) no target would keep: the
            # layer stays, and the report says why.
            entry.notes.append(f"left as is: {own}; replacing it would change its outputs")
            return m
        use_dims = dims if dims is not None else _dims(m, kind, found.dims)
        new = _build(target, m, kind, found.dims, use_dims, dict(kw), entry.notes)
        if new is None:
            entry.notes.append(f"no {target} implementation of {kind!r}; left as is")
            return m
        entry.target = type(new).__name__
        new_kind = registry.norm_kind(new)
        if new_kind is not None and _trailing(new_kind) != _trailing(kind):
            entry.notes.append(
                f"{entry.source} and {entry.target} normalize different dims (trailing vs "
                "dim 1); they agree on (N, C) inputs only"
            )
        new = carry.place_like(m, new)  # first: copying float64 state into float32 would round
        carry.carry(m, new.norm if isinstance(new, NoisyNorm) else new, kw, entry)  # its norm
        return new

    return carry.replace_modules(model, swap), report


def convert(
    model: nn.Module,
    to: Target | Mapping[type | str, Target],
    *,
    dims: int | None = None,
    on_drop: Literal["warn", "raise", "ignore"] = "warn",
    **kw: object,
) -> nn.Module:
    """Replace every normalization layer of ``model`` by another kind; return the model.

    See :func:`convert_with_report` for ``to``, ``dims`` and ``**kw``. When a layer
    could not carry all its state (e.g. running statistics into GroupNorm, a
    LayerNorm over (C, H, W) whose weight has no per-channel equivalent) or could not
    be converted, ``on_drop`` decides: ``"warn"`` (default) issues one
    :class:`ConversionWarning` listing them, ``"raise"`` raises ValueError (the model
    is then partly converted: pass a copy), ``"ignore"`` says nothing.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
        >>> net = convert(net, to="covshift")
        >>> net = convert(net, to=nn.LayerNorm)  # warns: running stats dropped
    """
    if on_drop not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_drop must be 'warn', 'raise' or 'ignore', got {on_drop!r}")
    model, report = convert_with_report(model, to, dims=dims, **kw)
    lossy = report.lossy
    if lossy and on_drop != "ignore":
        text = "normalization conversion lost state:\n" + "\n".join(f"  {e}" for e in lossy)
        if on_drop == "raise":
            raise ValueError(text)
        warnings.warn(text, ConversionWarning, stacklevel=2)
    return model
