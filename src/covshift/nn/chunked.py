"""The reference's terms on the CPU in pieces of about 2 MB along a dim no statistic
spans (docs/derivations.md §11): only ``y`` and ``dx`` are full-size, x - μ is written
into the output piece and transformed in place, other temporaries live in a per-thread
workspace (fresh full-size temporaries cost memory trips and page faults).
:class:`covshift.nn.backend.ReferenceFunction` runs it; tests force tiny pieces.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from covshift.nn.layout import NormLayout
from covshift.nn.reference import affine_view, compute_dtype, param_grad, sum_dims

__all__ = ["backward", "forward", "plan"]

# Chunks of about this many bytes (in the compute dtype), whose temporaries (x - μ,
# g · x̂, ...) stay in cache between the passes that use them (module docstring).
_CHUNK_BYTES = 2 * 2**20
# Pieces never exceed this (the workspace holds four of them per thread and dtype);
# inputs that cannot be cut that small take the plain path.
_MAX_PIECE_BYTES = 8 * 2**20
# Below this size the plain ops of the reference are faster: fewer calls, and their
# temporaries stay in cache anyway (a 60 x 100 BatchNorm1d: 400 us chunked, 260 plain).
_MIN_BYTES = 256 * 2**10
_workspace = threading.local()


def _scratch(count: int, shape: Sequence[int], dtype: torch.dtype) -> list[Tensor]:
    """``count`` contiguous buffers of ``shape`` in ``dtype``, reused across calls: per
    thread and dtype, grown to the largest piece seen (at most 4 x ``_MAX_PIECE_BYTES``)."""
    pool: dict[torch.dtype, list[Tensor]] = getattr(_workspace, "pool", None) or {}
    _workspace.pool = pool
    numel = math.prod(shape)
    bufs = pool.get(dtype, [])
    if len(bufs) < count or bufs[0].numel() < numel:
        size = max(numel, bufs[0].numel() if bufs else 0)
        bufs = [torch.empty(size, dtype=dtype) for _ in range(max(count, len(bufs)))]
        pool[dtype] = bufs
    return [b[:numel].view(shape) for b in bufs[:count]]


def plan(
    layout: NormLayout, x: Tensor, dtype: torch.dtype, any_size: bool = False
) -> tuple[int, int] | None:
    """``(dim, step)``: split the view along ``dim`` (not reduced: whole statistics groups)
    in pieces of ``step``; None (the plain path) off the CPU, where the caching allocator
    makes temporaries cheap, and under ``_MIN_BYTES`` unless ``any_size`` (tests)."""
    total = x.numel() * dtype.itemsize
    if x.device.type != "cpu" or total == 0 or (total < _MIN_BYTES and not any_size):
        return None
    shape = layout.view_shape
    for d, n in enumerate(shape):
        if d not in layout.stat_dims and n > 1:
            if total // n > _MAX_PIECE_BYTES:
                return None  # one slice alone is big: no workspace that size
            return d, max(1, _CHUNK_BYTES // (total // n))
    return (0, shape[0]) if total <= _MAX_PIECE_BYTES else None  # one piece


def _pieces(t: Tensor | None, dim: int, step: int, count: int) -> Sequence[Tensor | None]:
    """``t`` split along ``dim`` into ``count`` pieces in one call (one ``narrow`` per
    piece would cost more than small pieces' arithmetic), or repeated if it broadcasts."""
    if t is None or t.dim() <= dim or t.shape[dim] == 1:
        return [t] * count
    return t.split(step, dim)


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool,
    pieces: tuple[int, int],
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """:func:`covshift.nn.reference.forward` in the pieces ``(dim, step)`` of :func:`plan`."""
    dtype, m, sdims, (dim, step) = compute_dtype(x.dtype), layout.count, layout.stat_dims, pieces
    xv = x.reshape(layout.view_shape)
    y = torch.empty_like(xv)  # the one full-size allocation; keeps x's memory format
    same = x.dtype == dtype  # else: half input, float32 work in the workspace
    xs, ys = xv.split(step, dim), y.split(step, dim)
    ws, bs = (_pieces(affine_view(t, layout, dtype), dim, step, len(xs)) for t in (weight, bias))
    stats, bufs = [], []  # (mean, rstd, var) per piece; the workspace
    for xin, out, wc, bc in zip(xs, ys, ws, bs, strict=True):
        if not bufs or bufs[0].shape != xin.shape:
            bufs = _scratch(3, xin.shape, dtype)
        sq, xbuf, wbuf = bufs
        xf = xin if same else xbuf.copy_(xin)
        work = out if same else wbuf
        # Two passes: μ, then σ² = mean((x - μ)²). The deviations are written straight
        # into the output chunk, and every later step works in place on it (in-place
        # ops run several times faster than out-of-place ones with broadcasting).
        if subtract_mean:
            mean = xf.sum(sdims, keepdim=True).div_(m)  # (1.1)
            torch.sub(xf, mean, out=work)
        else:
            mean = None
            work.copy_(xf)
        var = torch.mul(work, work, out=sq).sum(sdims, keepdim=True).div_(m)  # (1.2)
        rstd = (var + eps).rsqrt_()  # (1.3)
        if layout.per_channel:
            work.mul_(rstd if wc is None else rstd * wc)  # (1.4)-(1.5): (x - μ)·(r·w)
        else:
            work.mul_(rstd)
            if wc is not None:
                work.mul_(wc)
        if bc is not None:
            work.add_(bc)
        if work is not out:
            out.copy_(work)
        stats.append((mean, rstd, var))
    means, rstds, variances = zip(*stats, strict=True)
    mean = None if means[0] is None else _join(means, dim)
    return y.reshape(layout.shape), mean, _join(rstds, dim), _join(variances, dim)


def backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
    needs: tuple[bool, bool, bool],
    pieces: tuple[int, int],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`covshift.nn.reference.backward` in the pieces ``(dim, step)`` of :func:`plan`."""
    need_dx, need_dw, need_db = needs
    dtype, m, (dim, step) = rstd.dtype, layout.count, pieces
    xv = x.reshape(layout.view_shape)
    dx = torch.empty_like(xv) if need_dx else None
    same = x.dtype == dtype and grad_out.dtype == dtype
    dw_parts, db_parts = [], []  # per piece
    pdims, sdims = layout.partial_dims, layout.stat_dims
    in_group = tuple(d for d in sdims if d not in pdims)
    xs, gs = xv.split(step, dim), grad_out.reshape(layout.view_shape).split(step, dim)
    k = len(xs)
    outs = dx.split(step, dim) if dx is not None else [None] * k
    w = affine_view(weight, layout, dtype)
    mus, rss, wcs = (_pieces(t, dim, step, k) for t in (mean, rstd, w))
    bufs: list[Tensor] = []
    for xin, gin, out, mu, rs, wc in zip(xs, gs, outs, mus, rss, wcs, strict=True):
        if not bufs or bufs[0].shape != xin.shape:
            bufs = _scratch(4, xin.shape, dtype)
        prod, gw, work, gf = bufs
        # The deviations x - μ go into the dx piece (when it has the compute dtype),
        # which later steps turn into dx in place (else they are copied there at the end).
        work = out if same and out is not None else work
        g = gin if gin.dtype == dtype else gf.copy_(gin)
        xc = torch.sub(xin, mu, out=work) if mu is not None else work.copy_(xin)
        if layout.per_channel:
            sum_g = _psum(g, pdims) if (need_db or mu is not None) else None  # S1 (5.1)
            sum_gxc = _psum(torch.mul(g, xc, out=prod), pdims)  # S2 (5.1)
            if need_db:
                assert sum_g is not None
                db_parts.append(sum_dims(sum_g, layout.affine_dims))
            if need_dw:
                dw_parts.append(sum_dims(sum_gxc * rs, layout.affine_dims))
            if out is not None:
                # dx = a·g + β·(x - μ) + γ (5.3), in place on x - μ.
                a = rs if wc is None else rs * wc
                s2 = sum_dims(sum_gxc if wc is None else sum_gxc * wc, in_group)
                xc.mul_(-(rs * rs * rs / m) * s2)
                if mu is not None:
                    assert sum_g is not None
                    xc.sub_((rs / m) * sum_dims(sum_g if wc is None else sum_g * wc, in_group))
                xc.addcmul_(g, a)
        else:
            xhat = xc.mul_(rs)
            if need_db:
                db_parts.append(_psum(g, layout.affine_dims))
            gx = torch.mul(g, xhat, out=prod)
            if need_dw:
                dw_parts.append(_psum(gx, layout.affine_dims))
            if out is not None:
                # dx = r·h - x̂·(r/M)·S2 - (r/M)·S1 (6.2), in place on x̂.
                gwc = g if wc is None else torch.mul(g, wc, out=gw)
                s2 = sum_dims(gx if wc is None else gx.mul_(wc), sdims).mul_(rs / m)
                xhat.mul_(s2.neg_())
                if mu is not None:
                    xhat.sub_(sum_dims(gwc, sdims).mul_(rs / m))
                xhat.addcmul_(gwc, rs)
        if out is not None and xc is not out:  # (x̂ is x - μ, scaled in place)
            out.copy_(xc)
    dw = param_grad(_join_sum(dw_parts, dim, layout), layout) if need_dw else None
    db = param_grad(_join_sum(db_parts, dim, layout), layout) if need_db else None
    return (None if dx is None else dx.reshape(layout.shape)), dw, db


def _psum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # Like sum_dims, but never returns ``t`` itself: it may be a workspace buffer that the
    # next piece overwrites.
    return t.sum(dims, keepdim=True) if dims else t.clone()


def _join(parts: Sequence[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _join_sum(parts: list[Tensor], dim: int, layout: NormLayout) -> Tensor:
    # Chunks along a dim the affine is constant over contribute partial sums (add
    # them); along an affine dim they hold disjoint slices (concatenate them).
    if len(parts) == 1:
        return parts[0]
    if dim in layout.affine_dims:
        return torch.stack(parts).sum(0)
    return torch.cat(parts, dim)
