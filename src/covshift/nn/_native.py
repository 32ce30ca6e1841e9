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

The one entry point, :func:`normalize`, runs forward and backward in one C++ autograd
node, so a training step runs no Python on the way back; under ``create_graph=True``
the node's backward is the closed form as differentiable ATen ops (double backward).
It returns None whenever the native path does not apply (CPU only; not under
torch.compile; float32/float64/float16/bfloat16; contiguous, or channels_last for
BatchNorm) and the caller takes the reference Function. Those guards run in C++
(``norm.cpp``, ``pick_config``): from Python they cost more than the kernels
themselves on small layers.

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

from covshift.nn._native_build import build
from covshift.nn._native_plan import _configs_of

if TYPE_CHECKING:
    from covshift.nn.layout import NormLayout
    from covshift.nn.running import RunningStats

__all__ = ["available", "build_seconds", "declined", "enabled", "load", "normalize", "use_native"]

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
    if x.device.type != "cpu" or x.numel() == 0 or x.dtype not in _DTYPES:
        return None
    return load()


def declined(x: Tensor) -> str:
    """Why :func:`normalize` answered None for ``x`` (asked by a forced path's error)."""
    if not _enabled:
        return "native kernels off (COVSHIFT_NATIVE=0 or use_native(False))"
    if x.device.type != "cpu" or x.numel() == 0:
        return "not a non-empty CPU tensor"
    if load() is None:
        return "the native extension did not build"
    if _compiled_autograd_on():
        return "compiled autograd is on (the C++ node has no compiled_args)"
    return "no native kernel serves this dtype, memory layout or layout"


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
    running: RunningStats | None = None,
) -> tuple[Tensor, Tensor | None, Tensor] | Tensor | None:
    """``(y, mean, var)`` as :func:`~covshift.nn.functional.normalize_with_stats` (``y``
    alone when ``stats`` is False), from one C++ autograd node (forward and backward
    without Python), or None.

    The node's backward runs the native kernel, or under ``create_graph=True`` the
    same closed form as differentiable ATen ops (double backward). ``running``: the
    buffers to update in the same call (BatchNorm in training): the counter (if given)
    += 1, then ``running ← (1 − m)·running + m·batch`` (``var·bessel``) with
    ``m = momentum``, or ``1 / counter`` when ``momentum`` is None.
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
