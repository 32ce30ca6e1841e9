"""Layouts: how a norm views its input and which dims one statistic reduces over.

Every layer is the same computation (:mod:`.reference`) over its own
:class:`NormLayout`, resolved from shapes once per argument set (resolving costs more
than a small normalization). docs/derivations.md §1 (one group), §5 (``partial_dims``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from covshift.nn import checks

Dims = int | Sequence[int]


@dataclass(frozen=True)
class NormLayout:
    """How ``x`` (``shape``) is viewed and reduced, from :func:`resolve_layout`: the math
    runs on ``view_shape`` (the channel dim split into (G, C // G) when grouped), one
    statistic over its ``stat_dims`` (``count`` = M elements; ``partial_dims``: less the
    within-group channel dim, for per-channel partial sums, §5). ``weight``/``bias``
    (``param_shape``, None without) broadcast as ``affine_shape``; ``per_channel``: the
    affine is constant over ``partial_dims`` (False for LayerNorm's element-wise one, §6).
    """

    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    stat_dims: tuple[int, ...]
    partial_dims: tuple[int, ...]
    affine_shape: tuple[int, ...] | None
    per_channel: bool
    count: int
    param_shape: tuple[int, ...] | None = None

    @property
    def affine_dims(self) -> tuple[int, ...]:
        """Dims of the view along which the affine is constant (dw, db sum over them)."""
        if self.affine_shape is None:
            return tuple(range(len(self.view_shape)))
        return tuple(d for d, n in enumerate(self.affine_shape) if n == 1)


def count(shape: Sequence[int], dims: Sequence[int]) -> int:
    """M, the number of elements of ``shape`` over ``dims``."""
    m = 1
    for d in dims:  # a loop, not a generator: torch.compile traces it
        m *= shape[d]
    return m


# --- The cache: one dict for resolve_layout's keys and the wrappers' keys

_layouts: dict[tuple, NormLayout] = {}
_MAX_LAYOUTS = 4096


def remembered(key: tuple) -> NormLayout | None:
    """The layout remembered for ``key`` (an argument set's shapes and ints), whose shape
    checks passed then; None the first time, and under torch.compile (symbolic shapes)."""
    if torch.compiler.is_compiling():
        return None
    return _layouts.get(key)


def remember(key: tuple, layout: NormLayout) -> NormLayout:
    """Remember ``layout`` for ``key`` (not under torch.compile); return it."""
    if not torch.compiler.is_compiling():
        if len(_layouts) > _MAX_LAYOUTS:  # many shapes seen: start over, not grow forever
            _layouts.clear()
        _layouts[key] = layout
    return layout


# --- The general case


def resolve_layout(
    shape: Sequence[int],
    reduce_dims: Dims,
    *,
    groups: int | None = None,
    channel_dim: int | None = 1,
    weight_shape: Sequence[int] | None = None,
    bias_shape: Sequence[int] | None = None,
) -> NormLayout:
    """Check the arguments of :func:`~covshift.nn.functional.normalize` against ``x``'s
    shape (ValueError) and resolve the view, remembered per argument set."""
    dims = reduce_dims if isinstance(reduce_dims, int) else tuple(reduce_dims)
    key = (tuple(shape), dims, groups, channel_dim, _tuple(weight_shape), _tuple(bias_shape))
    return remembered(key) or remember(key, _resolve(*key))


def _resolve(
    shape: Sequence[int],
    reduce_dims: Dims,
    groups: int | None,
    channel_dim: int | None,
    weight_shape: tuple[int, ...] | None,
    bias_shape: tuple[int, ...] | None,
) -> NormLayout:
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    dims = checks.dims(reduce_dims, ndim, "reduce_dims")
    if weight_shape is not None and bias_shape is not None and weight_shape != bias_shape:
        raise ValueError(
            f"weight and bias must have the same shape, got {weight_shape} and {bias_shape}"
        )
    affine = weight_shape if weight_shape is not None else bias_shape
    affine_shape = None
    view_shape, stat_dims, partial_dims = shape, dims, dims
    if channel_dim is None:
        if groups is not None:
            raise ValueError("groups splits the channel dim: pass channel_dim (an int) with it")
        if affine is not None:
            if len(affine) > ndim or shape[ndim - len(affine) :] != affine:
                raise ValueError(
                    f"with channel_dim=None the affine weight/bias must match the trailing "
                    f"dims of the input: got shape {affine} for input shape {shape}"
                )
            affine_shape = (1,) * (ndim - len(affine)) + affine
    else:
        c = checks.dims(channel_dim, ndim, "channel_dim")[0]
        channels = shape[c]
        channel_view: tuple[int, ...] = (channels,)
        if groups is None and c in dims:
            groups = 1  # the channel dim reduced without groups: one group
        if groups is not None:
            if c not in dims:
                raise ValueError(
                    f"groups={groups} normalizes groups of channels together, so reduce_dims "
                    f"must include channel_dim={c}; got reduce_dims={dims}"
                )
            if not isinstance(groups, int) or groups < 1 or channels % groups != 0:
                raise ValueError(
                    f"groups must be a positive int that divides the {channels} channels "
                    f"of dim {c}, got {groups!r}"
                )
            view_shape = (*shape[:c], groups, channels // groups, *shape[c + 1 :])
            stat_dims = tuple(d if d < c else d + 1 for d in dims)
            partial_dims = tuple(d for d in stat_dims if d != c + 1)
            channel_view = (groups, channels // groups)
        if affine is not None:
            if affine != (channels,):
                raise ValueError(
                    f"the affine weight/bias must have shape ({channels},), one value per "
                    f"channel of dim {c} of the input {shape}; got {affine}"
                )
            affine_shape = (1,) * c + channel_view + (1,) * (ndim - c - 1)

    per_channel = affine_shape is None or all(affine_shape[d] == 1 for d in partial_dims)
    return NormLayout(
        shape=shape,
        view_shape=view_shape,
        stat_dims=stat_dims,
        partial_dims=partial_dims,
        affine_shape=affine_shape,
        per_channel=per_channel,
        count=count(view_shape, stat_dims),
        param_shape=None if affine is None else tuple(int(n) for n in affine),
    )


# --- The functional wrappers' layouts: checked on the first call per shapes, remembered


def _tuple(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if shape is None else tuple(shape)


def shape_of(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def batch_norm_layout(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> NormLayout:
    """BatchNorm's layout in training (statistics over every dim but 1), after
    :func:`.checks.batch_norm` on the first call per argument shapes."""
    w, b = shape_of(weight), shape_of(bias)
    key = ("batch_norm", x.shape, shape_of(running_mean), shape_of(running_var), w, b)
    layout = remembered(key)
    if layout is None:
        checks.batch_norm(x, running_mean, running_var, weight, bias, training=True)
        dims = (0, *range(2, x.dim()))
        layout = remember(key, resolve_layout(x.shape, dims, weight_shape=w, bias_shape=b))
    return layout


def trailing_norm_layout(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    rms: bool,
) -> NormLayout:
    """LayerNorm's (``rms`` False) or RMSNorm's layout over the trailing dims, after
    their checks on the first call per argument shapes."""
    ns = normalized_shape if isinstance(normalized_shape, (int, tuple)) else tuple(normalized_shape)
    w, b = shape_of(weight), shape_of(bias)
    key = ("rms_norm" if rms else "layer_norm", x.shape, ns, w, b)
    layout = remembered(key)
    if layout is None:
        tail = checks.trailing_shape(x, normalized_shape, rms=rms)
        dims = tuple(range(x.dim() - len(tail), x.dim()))
        layout = resolve_layout(x.shape, dims, channel_dim=None, weight_shape=w, bias_shape=b)
        remember(key, layout)
    return layout


def group_norm_layout(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> NormLayout:
    """GroupNorm's layout, after :func:`.checks.group_norm` on the first call per shapes
    (remembered for an int ``num_groups`` only: 2.0 hashes as 2, but is refused)."""
    w, b = shape_of(weight), shape_of(bias)
    key = ("group_norm", x.shape, num_groups, w, b)
    layout = remembered(key) if type(num_groups) is int else None
    if layout is None:
        checks.group_norm(x, num_groups, weight, bias)
        dims = tuple(range(1, x.dim()))
        layout = resolve_layout(x.shape, dims, groups=num_groups, weight_shape=w, bias_shape=b)
        remember(key, layout)
    return layout
