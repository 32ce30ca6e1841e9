"""Compiling the native extension (:func:`torch.utils.cpp_extension.load`): flags,
cache folder (``$COVSHIFT_CACHE_DIR`` or ``~/.cache/covshift/extensions``), a name that
hashes the C++ sources, torch's version, the flags and the CPU (``-march=native``), and
an OS lock so that two processes never build in one folder at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["build", "cache_dir"]

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("norm.cpp", "norm_kernels.h")


def cache_dir() -> Path:
    """Where built extensions live: ``$COVSHIFT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/covshift/extensions`` (``~/.cache/covshift/extensions``)."""
    root = os.environ.get("COVSHIFT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "covshift" / "extensions"


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
    # The sources' folder too: torch's build files name the sources by their path, so
    # two checkouts sharing one cache folder would rebuild it for each other on every
    # first use (40 s or more each time); each gets its own build instead.
    for part in (torch.__version__, " ".join(_flags()), _cpu_tag(), str(_CSRC.resolve())):
        h.update(part.encode())
    return f"covshift_norm_{h.hexdigest()[:16]}"


@contextlib.contextmanager
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
