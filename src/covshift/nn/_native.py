"""The bridge to the fused CPU kernels (``csrc/``, docs/derivations.md §17).

Built on the first CPU call, never at import (:func:`build`); a failed build
warns once and the reference serves; ``COVSHIFT_NATIVE=0`` switches it off.
:func:`normalize` runs forward and backward in one C++ autograd node, or answers None.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

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
    """Switch the native path on or off inside a ``with`` block (tests, benchmarks);
    switching it on builds nothing by itself, the first call that can use it does."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    try:
        yield
    finally:
        _enabled = old


def load() -> ModuleType | None:
    """The compiled extension, built on first use (thread-safe, tried once per process);
    None, with one RuntimeWarning, if it cannot be had."""
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
    """Whether compiled autograd is on: the C++ node has no ``compiled_args`` (torch's
    generic Function with them costs as much as small layers' kernels); no dynamo import."""
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
    """:func:`.backend.normalize` by the C++ autograd node, or None where it does not apply."""
    # Once loaded, the C++ checks the rest; before, ``x`` is checked here, so that a
    # GPU-only process never builds the extension.
    mod = _module if _enabled else None
    if mod is None or torch.compiler.is_compiling():
        if not _enabled or torch.compiler.is_compiling() or x.device.type != "cpu":
            return None
        if x.numel() == 0 or x.dtype not in _DTYPES or (mod := load()) is None:
            return None
    if _compiled_autograd_on():
        return None
    cfg, cfg_cl = _configs_of(layout)
    rm, rv, counter, momentum, bessel = (None, None, None, 0.0, 1.0) if running is None else running
    return mod.normalize(
        x, weight, bias, cfg, cfg_cl, eps, subtract_mean, stats, rm, rv, counter, momentum, bessel
    )


# --- Building: torch.utils.cpp_extension.load into $COVSHIFT_CACHE_DIR (default
# ~/.cache/covshift/extensions), under a name that hashes the sources, torch's version,
# the flags and the CPU (-march=native), with an OS lock against concurrent builds.

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("norm.cpp", "norm_kernels.h")


def cache_dir() -> Path:
    """Where built extensions live: ``$COVSHIFT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/covshift/extensions`` (``~/.cache/covshift/extensions``)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("COVSHIFT_CACHE_DIR") or Path(xdg) / "covshift" / "extensions")


def _flags() -> list[str]:
    cpu = {"x86_64": "-march", "amd64": "-march", "aarch64": "-mcpu", "arm64": "-mcpu"}
    flag = cpu.get(platform.machine().lower())
    arch = [f"{flag}=native"] if flag else []
    # -fopenmp-simd: honour `#pragma omp simd` everywhere.
    return ["-O3", *arch, "-fopenmp-simd", "-DNDEBUG", *_openmp_flags()]


def _openmp_flags() -> list[str]:
    # at::parallel_for is inline OpenMP code, one thread unless the extension is built
    # with -fopenmp; on Linux it then shares the wheel's libgomp.so.1 (the soname
    # matches), so torch.set_num_threads applies. Elsewhere: the calling thread.
    linux = platform.system() == "Linux"
    return ["-fopenmp"] if linux and torch.backends.openmp.is_available() else []


def _cpu_tag() -> str:
    # Tuned for this CPU (-march=native): a shared cache must not hand it to another.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _name() -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        h.update((_CSRC / src).read_bytes())
    # The sources' folder too: torch's build files name sources by path, so two
    # checkouts sharing a cache would rebuild (40 s or more) for each other each time.
    for part in (torch.__version__, " ".join(_flags()), _cpu_tag(), str(_CSRC.resolve())):
        h.update(part.encode())
    return f"covshift_norm_{h.hexdigest()[:16]}"


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an ``flock`` on the build folder while torch builds or loads there: the kernel
    releases it when its holder dies, where torch's lock file, left by a process killed
    mid-build, blocks every later one forever (so a ``lock`` file found here is stale)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: torch's lock alone
        yield
        return
    with open(folder / "covshift-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension without the "No CUDA runtime is found" warning a CUDA
    build of torch logs at import on a machine without a GPU (nothing here is CUDA)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def build() -> ModuleType:
    """Build the extension into its cache folder, or load the build there; raises what
    the build raises (the caller decides what a failure means)."""
    cpp_extension = _import_cpp_extension()  # here: it imports setuptools (slow)
    name = _name()
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder):
        return cpp_extension.load(
            name=name,
            sources=[str(_CSRC / "norm.cpp")],
            extra_cflags=_flags(),
            extra_ldflags=_openmp_flags(),
            extra_include_paths=[str(_CSRC)],
            build_directory=str(folder),
            verbose=False,
        )


# --- Plans: a layout matched to a kernel's access pattern, packed for ``norm.cpp``.
# channel: x as (A, C, B) in memory, a statistic per channel (BatchNorm; B = 1 for
# channels_last and (N, C)); row: x as (R, K), a statistic per contiguous row
# (LayerNorm, RMSNorm, GroupNorm, InstanceNorm), the affine index (r mod G)·Cg + k // S.
# A layout that fits neither keeps the reference Function.


@dataclass(frozen=True)
class _Plan:
    """Which kernel serves a layout: sizes ``(A, C, B)`` (channel), ``(R, K, G, Cg, S)`` (row)."""

    kind: str
    sizes: tuple[int, ...]
    config: Tensor  # the same, packed for the C++ entry points (see norm.cpp, Config)


def _configs_of(layout: NormLayout) -> tuple[Tensor | None, Tensor | None]:
    """The packed plans of ``layout`` for a contiguous and a channels_last ``x`` (None:
    no kernel), kept on the layout itself (cheaper than a dict's ``__hash__`` call)."""
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
    params, affine = layout.param_shape or (), layout.affine_shape or ()
    for part in (squeezed, params, layout.view_shape, layout.stat_dims, affine):
        packed += [len(part), *part]
    return _Plan(kind, sizes, torch.tensor(packed, dtype=torch.int64))


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
