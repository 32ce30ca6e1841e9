"""What a layer says about its units: the per-layer-type tables, and the check of a
layer's claim against the shape of a tensor it takes or returns.

:func:`layer_claim` reads a layer's definition (a Linear's features, a convolution's
channels, a norm's ``normalized_shape`` or ``data_format``, ...) into a
:class:`UnitClaim`; :func:`place_claim` turns a claim into an axis of one tensor, or
says why it does not fit. This is rule 2 (``"layer"``) of :mod:`covshift.probe.units`,
whose docstring gives the whole table; the producer rules use it too, to note the
axis of every module's output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from covshift.probe.select import is_norm
from covshift.probe.units_axis import UnitAxis, _axis_text, _shape_text

__all__ = ["UnitClaim", "layer_claim", "place_claim"]

_CHANNELS_FIRST_NAME = re.compile(r"[123]d$")


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
    """Whether the module computes torch's LayerNorm/RMSNorm or covshift's (or
    covshift's Dynamic Tanh), so that a normalized_shape of (C,) certainly means the
    last axis."""
    forward = type(module).forward
    if forward in _TORCH_FORWARDS:
        return True
    try:
        from covshift.nn import dyt, layers
    except ImportError:  # pragma: no cover - covshift.nn is part of the package
        return False
    return forward in (layers.LayerNorm.forward, layers.RMSNorm.forward, dyt.DyT.forward)


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
    # Any module may say that its values have features last (covshift's transformer
    # blocks and their identity norms): ``channels_last = True`` and ``num_features``.
    n = _int(getattr(module, "num_features", None))
    if getattr(module, "channels_last", None) is True and n is not None:
        return UnitClaim(-1, n, f"{cls}.channels_last=True, num_features={n}")
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
