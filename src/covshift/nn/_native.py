"""Fused CPU kernels for the normalization family, compiled at first use.

``csrc/norm_kernels.h`` computes the same closed forms as :mod:`covshift.nn.reference`
(``docs/derivations.md``, "Native kernels") in one fused pass per direction where the
data allows, for two access patterns that cover every layer of the family:

- **channel**: ``x`` viewed as ``(A, C, B)`` in memory, one statistic per channel over
  ``A·B`` elements (BatchNorm: ``A = N, B = H·W`` in NCHW; ``B = 1`` for channels_last
  and for ``(N, C)`` inputs);
- **row**: ``x`` viewed as ``(R, K)``, one statistic per contiguous row (LayerNorm and
  RMSNorm over trailing dims; GroupNorm and InstanceNorm, whose ``(n, group)`` blocks
  are contiguous in NCHW), with the affine index ``(r mod G)·Cg + k // S``.

The extension is built with :func:`torch.utils.cpp_extension.load` the first time a
layer runs on the CPU (never at import, never at install time), into
``$COVSHIFT_CACHE_DIR`` or ``~/.cache/covshift/extensions``, under a name that hashes
the sources, the torch version and the CPU (it is compiled with ``-march=native``).
Later processes load the cached library in milliseconds. If the build fails (no
compiler, no ninja), a warning says so once and every call takes the pure-PyTorch
paths of :mod:`covshift.nn.backend`; nothing raises. ``COVSHIFT_NATIVE=0`` in the
environment switches the native path off without trying to build.

Entry points: :func:`normalize` (what the layers call) runs forward and backward in
one C++ autograd node, so a training step runs no Python on the way back; under
``create_graph=True`` the node's backward is the closed form as differentiable ATen
ops (double backward). :func:`forward`/:func:`backward` serve the pure functions
``normalize_fwd``/``normalize_bwd`` with grad mode off. All return None whenever the
native path does not apply (CPU only; not under torch.compile;
float32/float64/float16/bfloat16; contiguous, or channels_last for BatchNorm) and the
caller falls back. Those guards run in C++ (``norm.cpp``, ``pick_config``): from
Python they cost more than the kernels themselves on small layers.
"""

from __future__ import annotations

import contextlib
import hashlib
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

__all__ = ["available", "build_seconds", "cache_dir", "enabled", "load", "use_native"]

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("norm.cpp", "norm_kernels.h")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None  # why the build failed, once it has
_enabled = os.environ.get("COVSHIFT_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")
#: Seconds the first :func:`load` took (a compile, or loading the cached library).
build_seconds: float | None = None


def cache_dir() -> Path:
    """Where built extensions live: ``$COVSHIFT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/covshift/extensions`` (``~/.cache/covshift/extensions``)."""
    root = os.environ.get("COVSHIFT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "covshift" / "extensions"


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


def _flags() -> list[str]:
    machine = platform.machine().lower()
    arch = []
    if machine in ("x86_64", "amd64"):
        arch = ["-march=native"]
    elif machine in ("aarch64", "arm64"):
        arch = ["-mcpu=native"]
    # -fopenmp-simd: honour `#pragma omp simd` everywhere.
    return ["-O3", *arch, "-fopenmp-simd", "-DNDEBUG", *_openmp_flags()]


def _openmp_flags() -> list[str]:
    # With torch's OpenMP backend, at::parallel_for is inline code (ATen/ParallelOpenMP.h)
    # that runs on one thread unless the extension itself is compiled with -fopenmp.
    # Linked so, it shares torch's runtime: on Linux the wheel bundles libgomp.so.1,
    # already loaded when the extension is, and the loader matches the soname, so
    # torch.set_num_threads applies to the kernels too. (Elsewhere the compiler may
    # lack the flag: the kernels then run on the calling thread.)
    if platform.system() == "Linux" and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _cpu_tag() -> str:
    # The library is tuned for this CPU (-march=native): a cache shared between
    # machines must not hand one machine's build to another.
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
    for part in (torch.__version__, " ".join(_flags()), _cpu_tag()):
        h.update(part.encode())
    return f"covshift_norm_{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold an OS lock on the build folder while torch builds or loads the extension.

    torch's own lock is a file (``build/lock``) that a process killed mid-build leaves
    behind, after which every later process waits for it forever. An ``flock`` is
    released by the kernel when its holder dies; while this process holds it, no other
    covshift process is building here, so a ``lock`` file left in the folder is stale
    and is removed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: torch's lock alone
        yield
        return
    with open(build / "covshift-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
            from torch.utils import cpp_extension

            name = _name()
            build = cache_dir() / name
            build.mkdir(parents=True, exist_ok=True)
            with _build_lock(build):
                _module = cpp_extension.load(
                    name=name,
                    sources=[str(_CSRC / "norm.cpp")],
                    extra_cflags=_flags(),
                    extra_ldflags=_openmp_flags(),
                    extra_include_paths=[str(_CSRC)],
                    build_directory=str(build),
                    verbose=False,
                )
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


# --------------------------------------------------------------------------------------
# Matching a layout to a kernel
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Which kernel serves a layout, and the sizes it takes.

    ``sizes`` is ``(A, C, B)`` for the channel kind, ``(R, K, G, Cg, S)`` for the row
    kind; ``stat_shape`` is the keepdim shape of mean/rstd/var in the layout's view.
    """

    kind: str
    sizes: tuple[int, ...]
    stat_shape: tuple[int, ...]
    memory_format: torch.memory_format
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
        pair = (
            None if plans[0] is None else plans[0].config,
            None if plans[1] is None else plans[1].config,
        )
        object.__setattr__(layout, "_native_configs", pair)
        return pair


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for n in xs:
        out *= n
    return out


def _make_plan(layout: NormLayout, channels_last: bool) -> _Plan | None:
    found = _match(layout, channels_last)
    if found is None:
        return None
    kind, sizes, stat_shape, fmt = found
    sizes5 = (*sizes, 0, 0) if kind == "channel" else sizes
    squeezed = tuple(n for d, n in enumerate(layout.view_shape) if d not in layout.stat_dims)
    packed = [0 if kind == "channel" else 1, int(channels_last), *sizes5]
    for part in (
        squeezed,
        stat_shape,
        layout.param_shape or (),
        layout.view_shape,
        layout.stat_dims,
        layout.affine_shape or (),
    ):
        packed += [len(part), *part]
    config = torch.tensor(packed, dtype=torch.int64)
    return _Plan(kind, sizes, stat_shape, fmt, config)


def _match(
    layout: NormLayout, channels_last: bool
) -> tuple[str, tuple[int, ...], tuple[int, ...], torch.memory_format] | None:
    """Which kernel kind serves ``layout``, its sizes, the keepdim stat shape, the
    memory format ``x`` must have; None where no kernel fits."""
    view, sdims, affine = layout.view_shape, layout.stat_dims, layout.affine_shape
    nd = len(view)
    stat_shape = tuple(1 if d in sdims else n for d, n in enumerate(view))
    kept = [d for d in range(nd) if d not in sdims]
    # Channel kind: every dim but one is reduced, the affine (if any) runs along it
    # (one value per channel: not a single value broadcast over the channels too).
    c = kept[0] if len(kept) == 1 else -1
    if c >= 0 and (affine is None or (all(affine[d] == 1 for d in sdims) and affine[c] == view[c])):
        if channels_last:
            if c != 1 or nd not in (4, 5):
                return None
            fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
            return "channel", (_prod(view) // view[1], view[1], 1), stat_shape, fmt
        sizes = (_prod(view[:c]), view[c], _prod(view[c + 1 :]))
        return "channel", sizes, stat_shape, torch.contiguous_format
    if channels_last:
        return None
    # Row kind: the reduced dims are a trailing block starting at k0.
    k0 = nd - len(sdims)
    if sdims != tuple(range(k0, nd)) or k0 == 0:
        return None
    pre, blk = view[:k0], view[k0:]
    R, K = _prod(pre), _prod(blk)
    if affine is None:
        return "row", (R, K, 1, K, 1), stat_shape, torch.contiguous_format
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
    Cg = _prod(blk[:j])
    return "row", (R, K, G, Cg, K // Cg), stat_shape, torch.contiguous_format


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
