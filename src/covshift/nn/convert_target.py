"""Building what a normalization layer is replaced by, for :func:`covshift.nn.convert`:
a registry name, ``"torch"``/``"covshift"`` (the same kind and configuration in the
other implementation), a class or a factory, built for the source's channel count
(and input rank, where the target depends on it)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from covshift.nn import registry
from covshift.nn.registry import create_norm

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
        try:
            takes_dims = "dims" in inspect.signature(target).parameters
        except (TypeError, ValueError):
            takes_dims = False
        return target(channels, dims=dims, **kw) if takes_dims else target(channels, **kw)
    raise TypeError(
        f"to must be a registry name, 'torch', 'covshift', a class, a factory or a "
        f"mapping of those; got {target!r}"
    )
