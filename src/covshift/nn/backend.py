"""Which path computes a normalization, chosen once per call: the native C++ node
(:mod:`._native`) where it applies, else :class:`ReferenceFunction` (:mod:`.reference`,
on the CPU in cache-sized pieces by :mod:`.chunked`, docs/nn.md; a ``create_graph``
backward and torch.compile take the plain ops). :func:`report_paths` records the
choices, :func:`force` imposes one (tests, debugging).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from covshift.nn import _native, chunked, reference
from covshift.nn.layout import NormLayout
from covshift.nn.running import RunningStats

__all__ = ["Choice", "Path", "ReferenceFunction", "force", "normalize", "report_paths"]


class Path(str, enum.Enum):
    """The paths a normalization can take (see the module docstring)."""

    NATIVE = "native"
    CHUNKED = "chunked"
    REFERENCE = "reference"


@dataclass(frozen=True)
class Choice:
    """One recorded choice: ``step`` is ``"call"`` (the native node, both ways),
    ``"forward"`` or ``"backward"`` (the reference Function); ``reason`` says why."""

    step: str
    path: Path
    reason: str


_report: list[Choice] | None = None  # set by report_paths
_forced: Path | None = None  # set by force


@contextmanager
def _setting(name: str, value: Any) -> Iterator[Any]:
    old, globals()[name] = globals()[name], value
    try:
        yield value
    finally:
        globals()[name] = old


def report_paths() -> AbstractContextManager[list[Choice]]:
    """Record every path choice made inside the ``with`` block, in order."""
    return _setting("_report", [])


def force(path: Path | str) -> AbstractContextManager[Path]:
    """Take ``path`` for every eager normalization inside the ``with`` block; a call it
    cannot serve raises RuntimeError (a ``create_graph`` backward is the reference)."""
    return _setting("_forced", Path(path))


def _note(step: str, path: Path, reason: str) -> None:
    if _report is not None:
        _report.append(Choice(step, path, reason))


def _refuse(path: Path, why: str) -> RuntimeError:
    return RuntimeError(f"covshift.nn.backend.force({path.value!r}): {why}")


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool,
    *,
    stats: bool = False,
    running: RunningStats | None = None,
) -> Any:
    """``y``, or ``(y, mean, var)`` when ``stats`` (as :func:`.functional.normalize_with_stats`),
    updating ``running`` in the same call."""
    pieces = None
    if not torch.compiler.is_compiling():
        if _forced is None or _forced is Path.NATIVE:
            out = _native.normalize(x, weight, bias, layout, eps, subtract_mean, stats, running)
            if out is not None:
                _note("call", Path.NATIVE, "the C++ autograd node applies")
                return out
            if _forced is Path.NATIVE:
                raise _refuse(_forced, _native.declined(x))
        if _forced is not Path.REFERENCE:
            dtype = reference.compute_dtype(x.dtype)
            pieces = chunked.plan(layout, x, dtype, any_size=_forced is Path.CHUNKED)
            if pieces is None and _forced is Path.CHUNKED:
                raise _refuse(_forced, "no chunk plan (not a CPU tensor, or a slice too big)")
    if _report is not None:
        why = f"no native node; pieces {pieces}" if pieces else "no native node, no pieces"
        _note("forward", Path.REFERENCE if pieces is None else Path.CHUNKED, why)
    y, mean, var = ReferenceFunction.apply(x, weight, bias, layout, eps, subtract_mean, pieces)
    if not stats and running is None:
        return y
    dims = layout.stat_dims
    mean, var = None if mean is None else mean.squeeze(dims), var.squeeze(dims)
    if running is not None:
        assert mean is not None  # (BatchNorm subtracts the mean)
        running.track(mean, var)
    return (y, mean, var) if stats else y


class ReferenceFunction(torch.autograd.Function):
    """``(y, mean, var) = normalize(x, weight, bias)`` by :mod:`.reference` (in pieces by
    :mod:`.chunked` when ``pieces`` is given); ``mean``/``var`` carry no gradient. Saves
    nothing full-size but ``x``; under ``create_graph`` the statistics are recomputed
    from ``x`` with differentiable ops (§9)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        layout: NormLayout,
        eps: float,
        subtract_mean: bool,
        pieces: tuple[int, int] | None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        args = (x, weight, bias, layout, eps, subtract_mean)
        out = reference.forward(*args) if pieces is None else chunked.forward(*args, pieces)
        y, mean, rstd, var = out
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.layout, ctx.eps, ctx.subtract_mean, ctx.pieces = layout, eps, subtract_mean, pieces
        ctx.mark_non_differentiable(*(t for t in (mean, var) if t is not None))
        return y, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # create_graph: differentiable ops, statistics of x
            _note("backward", Path.REFERENCE, "grad mode on (create_graph): differentiable ops")
            mean, rstd = reference.recompute_stats(x, ctx.layout, ctx.eps, ctx.subtract_mean)
            grads = reference.backward(grad_y, x, mean, rstd, weight, ctx.layout, needs)
        elif ctx.pieces is not None:
            _note("backward", Path.CHUNKED, f"the forward's pieces {ctx.pieces}")
            grads = chunked.backward(grad_y, x, mean, rstd, weight, ctx.layout, needs, ctx.pieces)
        else:
            _note("backward", Path.REFERENCE, "the forward's path")
            grads = reference.backward(grad_y, x, mean, rstd, weight, ctx.layout, needs)
        # Gradients in the parameters' dtypes (the compute dtype may be wider).
        dx, dw, db = grads
        if dw is not None and weight is not None:
            dw = dw.to(weight.dtype)
        if db is not None:
            db = db.to(grad_y.dtype if weight is None else weight.dtype)
        return dx, dw, db, None, None, None, None
