"""Which path computes a normalization, chosen in one place, and a way to see it.

Every path computes the reference math of :mod:`covshift.nn.reference`; they differ in
speed and in where they apply:

==================  ==========================================================  ==========
path                what runs                                                    where
==================  ==========================================================  ==========
``native-node``     one C++ autograd node: fused kernels forward and backward   CPU eager
``native-kernels``  the fused kernels under the Python autograd.Function         CPU eager
``chunked``         the reference terms in cache-sized pieces (:mod:`.chunked`)  CPU eager
``reference``       the reference's plain out-of-place ops (:mod:`.reference`)    anywhere
``compiled``        the reference under torch.compile (:mod:`.compiled`)          compiled
==================  ==========================================================  ==========

:func:`normalize` is an eager call's choice: the native node when it applies, else
:class:`NormalizeFunction`, whose forward and backward each take :func:`forward` /
:func:`backward`: the reference with grad mode on (``create_graph``: plain ops that
autograd differentiates again), else the native kernels, the chunked path, the
reference, the first that applies. Whether the native code applies is checked in C++
(device, dtype, memory layout, a kernel for the layout): from Python the checks cost
more than the kernels on small layers, so the native entry points answer None where
they do not apply and the next path runs. Under torch.compile the functional
wrappers go to :mod:`.compiled` before any of this (``torch.compiler.is_compiling()``,
the first line of each); Dynamo would trace the eager choice's dead branches.

For tests and debugging, :func:`report_paths` records every choice with its reason,
and :func:`force` makes the choice take one path (and raise where it cannot).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from covshift.nn import _native, chunked, reference
from covshift.nn import running as running_stats
from covshift.nn._autograd import in_param_dtype, save, saved
from covshift.nn.layout import NormLayout

__all__ = [
    "Choice",
    "NormalizeFunction",
    "Path",
    "backward",
    "force",
    "forward",
    "normalize",
    "report_paths",
]

Running = tuple[Tensor | None, Tensor | None, Tensor | None, float | None, float]


class Path(str, enum.Enum):
    """The paths a normalization can take (see the module docstring)."""

    NATIVE_NODE = "native-node"
    NATIVE_KERNELS = "native-kernels"
    CHUNKED = "chunked"
    REFERENCE = "reference"
    COMPILED = "compiled"


@dataclass(frozen=True)
class Choice:
    """One recorded choice: ``step`` is ``"call"`` (the node, or the Python Function),
    ``"forward"`` or ``"backward"`` (inside the Function); ``reason`` says why."""

    step: str
    path: Path
    reason: str


_report: list[Choice] | None = None  # set by report_paths
_forced: Path | None = None  # set by force


@contextmanager
def report_paths() -> Iterator[list[Choice]]:
    """Record every path choice made inside the ``with`` block, in order.

    Example:
        >>> with report_paths() as choices:
        ...     covshift.nn.GroupNorm(2, 4)(torch.randn(3, 4, 5)).sum().backward()
        >>> [c.path.value for c in choices]  # ['native-node'] where the kernels build
    """
    global _report
    old, _report = _report, []
    try:
        yield _report
    finally:
        _report = old


@contextmanager
def force(path: Path | str) -> Iterator[None]:
    """Take ``path`` for every eager normalization inside the ``with`` block.

    A call the forced path cannot serve raises RuntimeError (a test that names a path
    then runs that path or fails). The backward of a ``create_graph=True`` call has
    one path, the reference (see the module docstring), forced or not.
    """
    global _forced
    path = Path(path)
    if path is Path.COMPILED:
        raise ValueError("the compiled path is taken under torch.compile; it cannot be forced")
    old, _forced = _forced, path
    try:
        yield
    finally:
        _forced = old


def _note(step: str, path: Path, reason: str) -> None:
    assert _report is not None
    _report.append(Choice(step, path, reason))


def _native_declined(x: Tensor) -> str:
    """Why the native code answered None for ``x`` (only asked when reporting)."""
    if not _native.enabled():
        return "native kernels off (COVSHIFT_NATIVE=0 or use_native(False))"
    if not _native.cpu_eager(x):
        return "not a non-empty CPU tensor"
    if _native.load() is None:
        return "the native extension did not build"
    if _native._compiled_autograd_on():
        return "compiled autograd is on (the C++ node has no compiled_args)"
    return "no native kernel serves this dtype, memory layout or layout"


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
    running: Running | None = None,
) -> Any:
    """An eager normalization call: ``y``, or ``(y, mean, var)`` when ``stats``.

    ``mean``/``var`` are detached, in the compute dtype, the reduced dims removed
    (:func:`covshift.nn.functional.normalize_with_stats`). ``running``:
    ``(running_mean, running_var, num_batches_tracked, momentum, bessel)`` to update
    in the same call (BatchNorm in training, :mod:`covshift.nn.running`), in C++ with
    the native node, else in Python after the forward.
    """
    if _forced is None or _forced is Path.NATIVE_NODE:
        out = _native.normalize(x, weight, bias, layout, eps, subtract_mean, stats, running)
        if out is not None:
            if _report is not None:
                _note("call", Path.NATIVE_NODE, "the C++ autograd node applies")
            return out
        if _forced is Path.NATIVE_NODE:
            raise _refuse(_forced, _native_declined(x))
    if running is not None:  # the node with the buffers declined: same rule in Python
        y, mean, var = normalize(x, weight, bias, layout, eps, subtract_mean, stats=True)
        rm, rv, counter, momentum, factor_bessel = running
        factor = running_stats.step_factor(momentum, counter, rm is not None)
        assert mean is not None
        running_stats.update(rm, rv, mean, var, factor, factor_bessel)
        return (y, mean, var) if stats else y
    y, mean, var = NormalizeFunction.apply(x, weight, bias, layout, eps, subtract_mean)
    if not stats:
        return y
    dims = layout.stat_dims
    return y, None if mean is None else mean.squeeze(dims), var.squeeze(dims)


class NormalizeFunction(torch.autograd.Function):
    """``(y, mean, var) = normalize(x, weight, bias)`` in Python autograd, where the
    native node does not apply; ``mean``/``var`` carry no gradient. Forward and
    backward each run :func:`forward` / :func:`backward`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        layout: NormLayout,
        eps: float,
        subtract_mean: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        stats = forward(x, weight, bias, layout, eps, subtract_mean)
        return save(ctx, stats, x, weight, layout, eps, subtract_mean)

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd, needs = saved(ctx)
        grads = backward(grad_y, x, mean, rstd, weight, ctx.layout, needs)
        return in_param_dtype(grads, grad_y, weight)


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(y, mean, rstd, var)`` of :func:`covshift.nn.reference.forward`, by the first
    path that applies: the reference with grad mode on (differentiable), else the
    native kernels, the chunked path, the reference."""
    if torch.is_grad_enabled():
        return _reference("forward", "grad mode on: differentiable ops")(
            x, weight, bias, layout, eps, subtract_mean
        )
    forced = _forced
    if forced is None or forced is Path.NATIVE_KERNELS:
        out = _native.forward(x, weight, bias, layout, eps, subtract_mean)
        if out is not None:
            if _report is not None:
                _note("forward", Path.NATIVE_KERNELS, "a native kernel serves the layout")
            return out
        if forced is Path.NATIVE_KERNELS:
            raise _refuse(forced, _native_declined(x))
    if forced is None or forced is Path.CHUNKED:
        pieces = chunked.plan(layout, x, reference.compute_dtype(x.dtype))
        if pieces is not None:
            if _report is not None:
                _note("forward", Path.CHUNKED, f"CPU, grad mode off; pieces {pieces}")
            return chunked.forward(x, weight, bias, layout, eps, subtract_mean, pieces)
        if forced is Path.CHUNKED:
            raise _refuse(forced, "no chunk plan (not a CPU tensor, or a slice too big)")
    why = "forced" if forced is not None else "neither the native kernels nor chunks apply"
    return _reference("forward", why)(x, weight, bias, layout, eps, subtract_mean)


def backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`covshift.nn.reference.backward`, by the first
    path that applies, as :func:`forward`; with grad mode on (``create_graph=True``)
    always the reference, whose plain ops autograd differentiates again."""
    if torch.is_grad_enabled():
        return _reference("backward", "grad mode on (create_graph): differentiable ops")(
            grad_out, x, mean, rstd, weight, layout, needs
        )
    forced = _forced
    if forced is None or forced is Path.NATIVE_KERNELS:
        out = _native.backward(grad_out, x, mean, rstd, weight, layout, needs)
        if out is not None:
            if _report is not None:
                _note("backward", Path.NATIVE_KERNELS, "a native kernel serves the layout")
            return out
        if forced is Path.NATIVE_KERNELS:
            raise _refuse(forced, _native_declined(x))
    if forced is None or forced is Path.CHUNKED:
        pieces = chunked.plan(layout, x, rstd.dtype)
        if pieces is not None:
            if _report is not None:
                _note("backward", Path.CHUNKED, f"CPU, grad mode off; pieces {pieces}")
            return chunked.backward(grad_out, x, mean, rstd, weight, layout, needs, pieces)
        if forced is Path.CHUNKED:
            raise _refuse(forced, "no chunk plan (not a CPU tensor, or a slice too big)")
    why = "forced" if forced is not None else "neither the native kernels nor chunks apply"
    return _reference("backward", why)(grad_out, x, mean, rstd, weight, layout, needs)


def _reference(step: str, why: str) -> Any:
    if _report is not None:
        _note(step, Path.REFERENCE, why)
    return reference.forward if step == "forward" else reference.backward
