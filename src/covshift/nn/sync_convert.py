"""Swapping BatchNorms for SyncBatchNorms and back, sharing parameters and buffers.

The mechanics behind :meth:`covshift.nn.SyncBatchNorm.convert_sync_batchnorm` and
:meth:`~covshift.nn.SyncBatchNorm.revert_sync_batchnorm` (whose docstrings say what
they do): which layers are plain BatchNorms (the registry of norm kinds), how state is
shared, how a model's modules are replaced once each.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from covshift.nn import registry

__all__ = ["from_sync", "to_sync"]


def to_sync(module: nn.Module, cls: type[nn.Module], process_group: Any) -> nn.Module:
    """Replace every plain BatchNorm in ``module`` by ``cls`` (a SyncBatchNorm)."""

    def swap(m: nn.Module) -> nn.Module | None:
        if isinstance(m, cls) or registry.norm_kind(m) not in ("batch", "sync_batch"):
            return None
        own = registry.own_behaviour(m)
        if own is not None:
            warnings.warn(
                f"{own}; left unconverted (converting it would drop its extra behaviour)",
                stacklevel=4,
            )
            return None
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        new = cls(*args, process_group, bias=m.bias is not None)
        new.original_class = getattr(m, "original_class", None) or type(m)
        return _share_state(m, new)

    return _replace_modules(module, swap)


def from_sync(module: nn.Module, to: type[nn.Module] | None) -> nn.Module:
    """Replace every SyncBatchNorm (covshift's or torch's) in ``module`` by the class it
    replaced (its ``original_class``), else ``to``."""

    def swap(m: nn.Module) -> nn.Module | None:
        if registry.norm_kind(m) != "sync_batch":
            return None
        target = getattr(m, "original_class", None) or to
        if target is None:
            raise ValueError(
                f"{type(m).__name__}({m.num_features}) has no record of the class it "
                "replaced; pass to=nn.BatchNorm1d/2d/3d (or covshift's) to revert it"
            )
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        return _share_state(m, target(*args, bias=m.bias is not None))

    return _replace_modules(module, swap)


def _share_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Make ``dst`` use ``src``'s parameter and buffer objects, and its mode."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if getattr(src, name, None) is not None and getattr(dst, name, None) is not None:
                setattr(dst, name, getattr(src, name))
    return dst.train(src.training)


def _replace_modules(root: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Apply ``swap(m) -> replacement | None`` to ``root`` and, below replaced-not
    modules, to every descendant; a module shared by several parents is replaced once."""
    done: dict[int, nn.Module | None] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) not in done:
            done[id(m)] = swap(m)
            if done[id(m)] is None:
                for name, child in list(m.named_children()):
                    new = visit(child)
                    if new is not child:
                        setattr(m, name, new)
        return done[id(m)] or m

    return visit(root)
