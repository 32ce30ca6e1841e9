"""Swap the normalization layers inside any model: ``convert(model, to=...)``.

Every normalization layer (torch.nn's BatchNorm*/SyncBatchNorm/InstanceNorm*/
LayerNorm/GroupNorm/RMSNorm, subclasses of those such as timm's, covshift's own and
its variants) is replaced by another kind, and what can be carried over is:

==================  =================================================================
carried             when
==================  =================================================================
weight, bias        both layers have them and the shapes agree
running statistics  both track them with the same shape (``num_batches_tracked`` too)
eps, momentum       the target has the attribute and ``eps=``/``momentum=`` not passed
requires_grad       per parameter; training/eval mode; device and dtype
==================  =================================================================

What could not be carried is *reported*, never silently lost: every replacement is
an entry of a :class:`ConversionReport` (path, from, to, carried, dropped, notes).
:func:`convert` warns once (:class:`ConversionWarning`) listing the entries that
dropped something (``on_drop="raise"`` makes it an error, ``"ignore"`` silences it);
:func:`convert_with_report` returns the report with the model. An affine map that is
the identity (weight all ones, bias all zeros) carries no information, so losing it
is not a drop.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU())
    >>> net = convert(net, to="group", num_groups=32)  # every BN by GroupNorm(32, C)
    >>> net = convert(net, to="covshift")  # same kinds, covshift's implementation
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from covshift.nn import kinds
from covshift.nn.convert_report import ConversionEntry, ConversionReport, ConversionWarning
from covshift.nn.noise import NoisyNorm
from covshift.nn.registry import create_norm

__all__ = [
    "ConversionEntry",
    "ConversionReport",
    "ConversionWarning",
    "convert",
    "convert_with_report",
    "norm_kind",
]

Target = str | type | Callable[..., nn.Module]


# --------------------------------------------------------------------------------------
# Recognizing normalization layers
# --------------------------------------------------------------------------------------

# What a layer is: the registry of norm kinds (covshift.nn.kinds).
_classify = kinds.classify
norm_kind = kinds.kind_of


def _trailing(kind: str) -> bool:
    """Whether ``kind``'s statistics run over the trailing dims (not over dim 1)."""
    return kinds.get(kind).trailing


def _num_features(m: nn.Module, kind: str) -> int:
    if kind == "group":
        return int(m.num_channels)
    if _trailing(kind):
        # (C,) for features last; (C, H, W) for a LayerNorm over a whole NCHW sample.
        return int(m.normalized_shape[0])
    return int(m.num_features)


def _dims(m: nn.Module, kind: str, dims: int | None) -> int | None:
    if dims is None and kind == "sync_batch":
        original = getattr(m, "original_class", None)
        found = None if original is None else kinds.classify_class(original)
        dims = None if found is None else found[2]
    return dims


# --------------------------------------------------------------------------------------
# Building the target
# --------------------------------------------------------------------------------------


def _same_kind_args(m: nn.Module, kind: str) -> tuple[tuple[object, ...], dict[str, object]]:
    """Constructor arguments that rebuild ``m``'s exact configuration (torch's names)."""
    if kind in ("batch", "instance", "sync_batch"):
        return (m.num_features,), {
            "eps": m.eps,
            "momentum": m.momentum,
            "affine": m.affine,
            "track_running_stats": m.track_running_stats,
        }
    if kind == "group":
        return (m.num_groups, m.num_channels), {"eps": m.eps, "affine": m.affine}
    if kind == "layer":
        kw: dict[str, object] = {"eps": m.eps, "elementwise_affine": m.elementwise_affine}
        if m.elementwise_affine and getattr(m, "bias", None) is None:
            kw["bias"] = False
        return (tuple(m.normalized_shape),), kw
    if kind == "rms":
        return (tuple(m.normalized_shape),), {
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
        }
    raise AssertionError(kind)


def _implementation_class(kind: str, base: type, library: str) -> type | None:
    """The class of the same kind and input rank as ``base`` in ``library`` ("torch" or
    "covshift"), from the registry of kinds; None where it has none (Batch Renorm and
    Ghost BN have no torch counterpart)."""
    entry = kinds.get(kind)
    found = kinds.classify_class(base)
    dims = None if found is None else found[2]
    table = entry.torch_classes if library == "torch" else entry.classes
    return table.get(dims)


def _build_for_class(cls: type, channels: int, source: nn.Module, kind: str, kw: dict) -> nn.Module:
    """``cls(channels, **kw)``, or ``cls(num_groups, channels, **kw)`` for GroupNorm-like
    classes (whose first constructor parameter is ``num_groups``)."""
    kw = dict(kw)
    try:
        params = list(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        params = []
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
    base: type,
    kind: str,
    dims: int | None,
    kw: dict,
    notes: list[str],
) -> nn.Module | None:
    channels = _num_features(m, kind)
    if isinstance(target, str) and target in ("torch", "covshift"):
        cls = _implementation_class(kind, base, target)
        if cls is None:
            return None
        args, same = _same_kind_args(m, kind if kind != "sync_batch" else "batch")
        new = cls(*args, **{**same, **kw})
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
        try:
            takes_dims = "dims" in inspect.signature(target).parameters
        except (TypeError, ValueError):
            takes_dims = False
        return target(channels, dims=dims, **kw) if takes_dims else target(channels, **kw)
    raise TypeError(
        f"to must be a registry name, 'torch', 'covshift', a class, a factory or a "
        f"mapping of those; got {target!r}"
    )


# --------------------------------------------------------------------------------------
# Carrying state
# --------------------------------------------------------------------------------------

_CONSUMED = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _is_identity(name: str, t: Tensor) -> bool:
    value = 1.0 if name == "weight" else 0.0
    return bool(torch.all(t.detach() == value))


def _is_fresh(m: nn.Module) -> bool:
    """Running statistics never updated (they carry no information)."""
    count = getattr(m, "num_batches_tracked", None)
    if isinstance(count, Tensor):
        return int(count) == 0
    return bool(torch.all(m.running_mean == 0) and torch.all(m.running_var == 1))


def _carry(src: nn.Module, dst: nn.Module, kw: dict, entry: ConversionEntry) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if not isinstance(s, Tensor):
                continue
            if isinstance(d, Tensor):
                if d.shape == s.shape:
                    d.copy_(s)
                    d.requires_grad_(s.requires_grad)
                    entry.carried.append(name)
                else:
                    entry.dropped.append(
                        f"{name}: shape {tuple(s.shape)} does not fit {tuple(d.shape)}"
                    )
            elif not _is_identity(name, s):
                entry.dropped.append(f"{name}: the target has no {name}")
        s_mean, d_mean = getattr(src, "running_mean", None), getattr(dst, "running_mean", None)
        if isinstance(s_mean, Tensor):
            if isinstance(d_mean, Tensor) and d_mean.shape == s_mean.shape:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    s, d = getattr(src, name, None), getattr(dst, name, None)
                    if isinstance(s, Tensor) and isinstance(d, Tensor):
                        d.copy_(s)
                        entry.carried.append(name)
            elif not _is_fresh(src):
                entry.dropped.append(
                    "running_mean, running_var: the target tracks no running statistics "
                    "of that shape"
                )
        for name in ("eps", "momentum"):
            value = getattr(src, name, None)
            if name not in kw and hasattr(dst, name) and hasattr(src, name):
                if value is None and name == "eps" and dst.eps is not None:
                    continue  # RMSNorm's eps=None (machine eps) has no float equivalent
                setattr(dst, name, value)
                entry.carried.append(name)
    # Whatever else the source holds (a subclass's extra parameters, buffers or
    # child modules, e.g. a fused activation) has no place in the target.
    for name, _ in src.named_parameters(recurse=False):
        if name not in _CONSUMED:
            entry.dropped.append(f"parameter {name}")
    for name, _ in src.named_buffers(recurse=False):
        if name not in _CONSUMED:
            entry.dropped.append(f"buffer {name}")
    for name, child in src.named_children():
        entry.dropped.append(f"child module {name} ({type(child).__name__})")


def _state_holder(new: nn.Module) -> nn.Module:
    """Where the carried state goes: the wrapped norm of a NoisyNorm, else ``new``."""
    return new.norm if isinstance(new, NoisyNorm) else new


def _place_like(src: nn.Module, dst: nn.Module) -> nn.Module:
    ref = next((t for t in (*src.parameters(), *src.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        dst = dst.to(device=ref.device, dtype=ref.dtype)
    return dst.train(src.training)


# --------------------------------------------------------------------------------------
# The entry points
# --------------------------------------------------------------------------------------


def _resolve_target(to: Target | Mapping, m: nn.Module, kind: str) -> Target | None:
    """What ``m`` becomes, or None to leave it (no mapping key matches, or it already
    is in the library that ``"torch"``/``"covshift"`` asks for)."""
    target: Target | None = to if not isinstance(to, Mapping) else None
    if isinstance(to, Mapping):
        for key, value in to.items():
            if (isinstance(key, str) and key == kind) or (
                isinstance(key, type) and isinstance(m, key)
            ):
                target = value
                break
    if isinstance(target, str) and target in ("torch", "covshift"):
        # Anything not defined in covshift (torch.nn's, timm's subclasses) is "torch".
        is_covshift = type(m).__module__.split(".")[0] == "covshift"
        if is_covshift == (target == "covshift"):
            return None
    return target


def _own_behaviour(m: nn.Module, base: type) -> str | None:
    """What ``m`` does beyond its base norm class (None: nothing), e.g. timm's
    BatchNormAct2d (a fused activation) or LayerNorm2d (a channels-first permute)."""
    if type(m).forward is not base.forward:
        return f"{type(m).__name__} overrides {base.__name__}'s forward"
    children = [f"{name} ({type(c).__name__})" for name, c in m.named_children()]
    if children:
        return f"{type(m).__name__} has child modules: {', '.join(children)}"
    return None


def convert_with_report(
    model: nn.Module,
    to: Target | Mapping[type | str, Target],
    *,
    dims: int | None = None,
    **kw: object,
) -> tuple[nn.Module, ConversionReport]:
    """Replace every normalization layer of ``model``; return ``(model, report)``.

    Args:
        model: any module; changed in place (its children are replaced). When
            ``model`` itself is a norm layer, its replacement is returned.
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
        dims: the input's spatial rank (1, 2, 3) for targets that depend on it;
            by default taken from the source (BatchNorm2d -> 2); a guess (noted in the
            report) for LayerNorm/GroupNorm/RMSNorm sources.
        **kw: passed to every target constructor (e.g. ``num_groups=32``, ``eps=``).

    Layers are matched by isinstance against torch.nn's and covshift's classes, so
    subclasses (timm's) are converted too; a subclass's extra parameters or buffers
    are reported as dropped. A subclass with its own ``forward`` or child modules
    (timm's BatchNormAct2d, LayerNorm2d) is left as it is and reported as skipped:
    no target would compute what its forward adds. Modules inside a replaced layer
    are not visited; a module shared by several parents is converted once.
    """
    report = ConversionReport()
    done: dict[int, nn.Module] = {}

    def visit(m: nn.Module, path: str) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        found = _classify(m)
        target = None if found is None else _resolve_target(to, m, found[1])
        if found is None or target is None:
            for name, child in list(m.named_children()):
                new = visit(child, f"{path}.{name}" if path else name)
                if new is not child:
                    setattr(m, name, new)
            done[id(m)] = m
            return m
        base, kind, base_dims = found
        entry = ConversionEntry(path, type(m).__name__, "")
        own = _own_behaviour(m, base)
        if own is not None:
            # A behaviour (a fused activation, a permutation) no target would keep: the
            # layer stays, and the report says why.
            entry.notes.append(f"left as is: {own}; replacing it would change its outputs")
            report.entries.append(entry)
            done[id(m)] = m
            return m
        use_dims = dims if dims is not None else _dims(m, kind, base_dims)
        new = _build(target, m, base, kind, use_dims, dict(kw), entry.notes)
        report.entries.append(entry)
        if new is None:
            entry.notes.append(f"no {target} implementation of {kind!r}; left as is")
            done[id(m)] = m
            return m
        entry.target = type(new).__name__
        new_kind = norm_kind(new)
        if new_kind is not None and _trailing(new_kind) != _trailing(kind):
            entry.notes.append(
                f"{entry.source} and {entry.target} normalize different dims (trailing vs "
                "dim 1); they agree on (N, C) inputs only"
            )
        new = _place_like(m, new)  # first: copying float64 state into float32 would round
        _carry(m, _state_holder(new), kw, entry)
        done[id(m)] = new
        return new

    return visit(model, ""), report


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
