"""Fused CPU kernels for the normalization family, compiled at first use: the bridge
between the layers and the C++ extension.

``csrc/norm_kernels.h`` computes the same closed forms as :mod:`covshift.nn.reference`
(``docs/derivations.md``, "Native kernels") in one fused pass per direction where the
data allows, for two access patterns (channel and row) that cover every layer of the
family; :mod:`._native_plan` matches each layout to one of them.

The extension is built the first time a layer runs on the CPU (never at import, never
at install time), into a cache that later processes load in milliseconds (how, where
and under what name: :mod:`._native_build`). If the build fails (no compiler, no
ninja), a warning says so once and every call takes the pure-PyTorch paths of
:mod:`covshift.nn.backend`; nothing raises. ``COVSHIFT_NATIVE=0`` in the environment
switches the native path off without trying to build.

Entry points: :func:`normalize` (what the layers call) runs forward and backward in
one C++ autograd node, so a training step runs no Python on the way back; under
``create_graph=True`` the node's backward is the closed form as differentiable ATen
ops (double backward). :func:`forward`/:func:`backward` serve the pure functions
``normalize_fwd``/``normalize_bwd`` with grad mode off. All return None whenever the
native path does not apply (CPU only; not under torch.compile;
float32/float64/float16/bfloat16; contiguous, or channels_last for BatchNorm) and the
caller falls back. Those guards run in C++ (``norm.cpp``, ``pick_config``): from
Python they cost more than the kernels themselves on small layers.

The process-wide state (the loaded module, the build error, the on/off switch) lives
in this module, beside the entry points that read it: :func:`normalize` runs on every
training step of every layer and reads it as plain globals.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

# _name and _make_plan are re-exported: tests find the cached build by its name, and
# check the kernel plans, through this module.
from covshift.nn._native_build import _name as _name
from covshift.nn._native_build import build, cache_dir
from covshift.nn._native_plan import _configs_of
from covshift.nn._native_plan import _make_plan as _make_plan

if TYPE_CHECKING:
    from covshift.nn.layout import NormLayout

__all__ = ["available", "build_seconds", "cache_dir", "enabled", "load", "use_native"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None  # why the build failed, once it has
_enabled = os.environ.get("COVSHIFT_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")
#: Seconds the first :func:`load` took (a compile, or loading the cached library).
build_seconds: float | None = None


def enabled() -> bool:
    """Whether the native path may be used (``COVSHIFT_NATIVE`` and :func:`use_native`)."""
    return _enabled


@contextmanager
def use_native(flag: bool) -> Iterator[None]:
    """Switch the native path on or off inside a ``with`` block (tests, benchmarks).

    Switching it on builds nothing by itself; the first call that can use it does.
    """
    global _enabled
    old, _enabled = _enabled, bool(flag)
    try:
        yield
    finally:
        _enabled = old


def load() -> ModuleType | None:
    """The compiled extension, building it on first use; None if it cannot be had.

    Thread-safe; tries once per process. A failure warns (RuntimeWarning) once.
    """
    global _module, _error, build_seconds
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        start = time.perf_counter()
        try:
            _module = build()
        except Exception as exc:  # no compiler, no ninja, a compile error: fall back
            lines = str(exc).strip().splitlines()
            _error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            warnings.warn(
                "covshift: the native CPU normalization kernels could not be built "
                f"({_error}); using the pure-PyTorch path, which gives the same results "
                "more slowly. Set COVSHIFT_NATIVE=0 to skip the build attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
        build_seconds = time.perf_counter() - start
    return _module


def available() -> bool:
    """Whether the native path is enabled and its extension builds (building it if needed)."""
    return _enabled and load() is not None


def cpu_eager(x: Tensor) -> bool:
    """Whether ``x`` is a non-empty CPU tensor outside torch.compile: where the native
    kernels and the chunked pure path (``covshift.nn.chunked``) may run. (Off the CPU
    kernel launches cost more than cache misses; under torch.compile inductor fuses
    the plain graph path itself.)"""
    return x.device.type == "cpu" and x.numel() > 0 and not torch.compiler.is_compiling()


def _ready(x: Tensor) -> ModuleType | None:
    """The extension, if the native path may be tried on ``x``; the C++ entry points
    check the rest (device, dtype, memory layout, ...) and answer None.

    Before the extension is loaded ``x`` itself is checked here too, so that a
    process that never runs a kernel-eligible input (GPU only) never builds it.
    """
    if not _enabled or torch.compiler.is_compiling():
        return None
    if _module is not None:
        return _module
    if not cpu_eager(x) or x.dtype not in _DTYPES:
        return None
    return load()


def _compiled_autograd_on() -> bool:
    """Whether compiled autograd (``torch._dynamo.compiled_autograd``) is enabled now.

    The C++ node has no ``compiled_args``/``apply_with_saved`` (what compiled autograd
    asks of every node: the generic torch::autograd::Function that has them costs as
    much as the kernels on small layers, see norm.cpp), so :func:`normalize` declines
    while it is on, and the layers take the pure path's Python autograd.Function,
    which compiled autograd traces. Enabled by ``compiled_autograd._enable`` and, with
    ``torch._dynamo.config.compiled_autograd``, inside every compiled frame (also in
    its graph-broken eager parts). A module lookup: nothing to ask before dynamo is
    imported, and no import of it from here.
    """
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(ca.compiled_autograd_enabled)


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool,
    stats: bool = True,
    running: tuple[Tensor | None, Tensor | None, Tensor | None, float | None, float] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor] | Tensor | None:
    """``(y, mean, var)`` as :func:`~covshift.nn.functional.normalize_with_stats` (``y``
    alone when ``stats`` is False), from one C++ autograd node (forward and backward
    without Python), or None.

    The node's backward runs the native kernel, or under ``create_graph=True`` the
    same closed form as differentiable ATen ops (double backward). ``running``:
    ``(running_mean, running_var, num_batches_tracked, momentum, bessel)`` to update
    in the same call (BatchNorm in training): the counter (if given) += 1, then
    ``running ← (1 − m)·running + m·batch`` (``var·bessel``) with ``m = momentum``,
    or ``1 / counter`` when ``momentum`` is None.
    """
    # _ready, inlined for the common case (called on every training step of every layer).
    mod = _module if _enabled and _module is not None else None
    if mod is None or torch.compiler.is_compiling():
        mod = _ready(x)
        if mod is None:
            return None
    if _compiled_autograd_on():
        return None
    cfg, cfg_cl = _configs_of(layout)
    if running is None:
        return mod.normalize(
            x, weight, bias, cfg, cfg_cl, eps, subtract_mean, stats, None, None, None, 0.0, 1.0
        )
    rm, rv, counter, momentum, bessel = running
    return mod.normalize(
        x, weight, bias, cfg, cfg_cl, eps, subtract_mean, stats, rm, rv, counter, momentum, bessel
    )


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: NormLayout,
    eps: float,
    subtract_mean: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor] | None:
    """``(y, mean, rstd, var)`` as :func:`~covshift.nn.functional.normalize_fwd`, or None."""
    mod = _ready(x)
    if mod is None:
        return None
    return mod.forward(x, weight, bias, *_configs_of(layout), eps, subtract_mean)


def backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    weight: Tensor | None,
    layout: NormLayout,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """``(dx, dweight, dbias)`` as :func:`~covshift.nn.functional.normalize_bwd`, or None."""
    mod = _ready(x)
    if mod is None:
        return None
    return mod.backward(grad_out, x, mean, rstd, weight, *_configs_of(layout), *needs)


def update_running(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    factor: float,
    bessel: float,
) -> bool:
    """``running ← (1 − m)·running + m·batch`` (``var·bessel`` for the variance) in one
    native call; False (nothing done) where the native path does not apply."""
    mod = _ready(mean)
    if mod is None or mean.device.type != "cpu":
        return False
    for t in (running_mean, running_var):
        if t is not None and t.device.type != "cpu":
            return False
    mod.update_running(running_mean, running_var, mean, var, factor, bessel)
    # The kernel wrote the buffers through their data pointers: tell autograd, so
    # a graph that saved them notices (as after any in-place op).
    torch.autograd.graph.increment_version(
        [t for t in (running_mean, running_var) if t is not None]
    )
    return True
