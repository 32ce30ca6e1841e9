"""Matching a layout to a native kernel's access pattern, packed for ``norm.cpp``.

**channel**: ``x`` as ``(A, C, B)`` in memory, a statistic per channel (BatchNorm;
``B = 1`` for channels_last and (N, C)); **row**: ``x`` as ``(R, K)``, a statistic per
contiguous row (LayerNorm, RMSNorm, GroupNorm, InstanceNorm), the affine index
``(r mod G)·Cg + k // S``. A layout that fits neither keeps the reference Function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from covshift.nn.layout import NormLayout


@dataclass(frozen=True)
class _Plan:
    """Which kernel serves a layout, and the sizes it takes.

    ``sizes`` is ``(A, C, B)`` for the channel kind, ``(R, K, G, Cg, S)`` for the row kind.
    """

    kind: str
    sizes: tuple[int, ...]
    config: Tensor  # the same, packed for the C++ entry points (see norm.cpp, Config)


def _configs_of(layout: NormLayout) -> tuple[Tensor | None, Tensor | None]:
    """The packed plans of ``layout`` for a contiguous and a channels_last input (None
    where no kernel fits); the C++ entry points pick by ``x``'s memory layout.

    Kept on the (frozen) layout itself, as its hash is: an attribute read costs less
    than a dict lookup, which would call ``NormLayout.__hash__`` in Python.
    """
    try:
        return layout._native_configs  # type: ignore[attr-defined]
    except AttributeError:
        plans = (_make_plan(layout, False), _make_plan(layout, True))
        pair = tuple(None if plan is None else plan.config for plan in plans)
        object.__setattr__(layout, "_native_configs", pair)
        return pair


def _make_plan(layout: NormLayout, channels_last: bool) -> _Plan | None:
    found = _match(layout, channels_last)
    if found is None:
        return None
    kind, sizes = found
    sizes5 = (*sizes, 0, 0) if kind == "channel" else sizes
    squeezed = tuple(n for d, n in enumerate(layout.view_shape) if d not in layout.stat_dims)
    packed = [0 if kind == "channel" else 1, int(channels_last), *sizes5]
    for part in (
        squeezed,
        layout.param_shape or (),
        layout.view_shape,
        layout.stat_dims,
        layout.affine_shape or (),
    ):
        packed += [len(part), *part]
    config = torch.tensor(packed, dtype=torch.int64)
    return _Plan(kind, sizes, config)


def _match(layout: NormLayout, channels_last: bool) -> tuple[str, tuple[int, ...]] | None:
    """Which kernel kind serves ``layout`` (for an ``x`` in channels_last memory, or
    contiguous), and its sizes; None where no kernel fits."""
    view, sdims, affine = layout.view_shape, layout.stat_dims, layout.affine_shape
    nd = len(view)
    kept = [d for d in range(nd) if d not in sdims]
    # Channel kind: every dim but one is reduced, the affine (if any) runs along it
    # (one value per channel: not a single value broadcast over the channels too).
    c = kept[0] if len(kept) == 1 else -1
    if c >= 0 and (affine is None or (all(affine[d] == 1 for d in sdims) and affine[c] == view[c])):
        if channels_last:
            if c != 1 or nd not in (4, 5):
                return None
            return "channel", (math.prod(view) // view[1], view[1], 1)
        return "channel", (math.prod(view[:c]), view[c], math.prod(view[c + 1 :]))
    if channels_last:
        return None
    # Row kind: the reduced dims are a trailing block starting at k0.
    k0 = nd - len(sdims)
    if sdims != tuple(range(k0, nd)) or k0 == 0:
        return None
    pre, blk = view[:k0], view[k0:]
    R, K = math.prod(pre), math.prod(blk)
    if affine is None:
        return "row", (R, K, 1, K, 1)
    a_pre, a_blk = affine[:k0], affine[k0:]
    # Affine over the block: its leading j dims in full, ones after (LayerNorm: all of
    # it; GroupNorm: the channels of a group, constant over the spatial dims).
    j = len(blk)
    while j > 0 and a_blk[j - 1] == 1:
        j -= 1
    if a_blk[:j] != blk[:j]:
        return None
    # Over the kept dims, only the last may vary (the group, or the channel of
    # InstanceNorm), the row index then runs over it fastest.
    if any(a != 1 for a in a_pre[:-1]) or a_pre[-1] not in (1, pre[-1]):
        return None
    G = pre[-1] if a_pre[-1] != 1 else 1
    Cg = math.prod(blk[:j])
    return "row", (R, K, G, Cg, K // Cg)
