"""Forward+backward time and memory of covshift's normalization layers against torch.nn's.

For each row the torch.nn layer and covshift's are built with the same state, and
``y = layer(x); autograd.grad(y, [x, *params], g)`` is timed for four contenders:
torch.nn, covshift with its native CPU kernels ("native", :mod:`covshift.nn._native`),
covshift's pure-PyTorch path ("pure", the native kernels switched off: the reference
Function in cache-sized pieces, :mod:`covshift.nn.chunked`) and the same without the
pieces ("ref", ``backend.force("reference")``); "pure/ref" is what the chunked pieces
buy where the native node does not run. Samples
are *interleaved* (torch, native, pure, ref, torch, ...) so that background load on a
shared machine hits all alike; each sample runs the step enough times to last a few
milliseconds (small shapes); the table shows medians and the ratios to torch.nn
(below 1.0: covshift is faster), and the ratio of the fastest samples ("n/t min", less
moved by a preempted sample on a busy machine). The last row times one SGD training step of the
Ioffe & Szegedy MLP (``build_mlp(784, 10, norm="batch")``, batch 60) against the same
model with torch.nn.BatchNorm1d swapped in.

Floor columns: the time of a layer's least memory traffic, five tensors of x's size
(forward: read x, write y; backward: read g and x, write dx), at the bandwidth of a
plain ``copy_`` of x measured in the same run (5/2 of the copy's time), and covshift's
native time over it. Below ~2 a kernel is near what memory allows; the small shapes,
which sit in cache, are bound by per-call overhead instead.

Memory columns: bytes autograd saves for backward (``saved_tensors_hooks``, distinct
storages) and the peak of tensor bytes allocated during forward+backward above what
was live before (CPU: from the profiler's per-op memory records, an approximation that
cannot see inside a single kernel; CUDA: ``max_memory_allocated``).

Two memory regimes for eager mode (``--memory``, default both). *fresh*: as a CPU
training step runs by default, glibc serves every large tensor (above ~128 KB) with a
fresh mmap, and the first write to each 4 KB page faults; on a VM that can cost more
than the normalization itself, and it varies from run to run (covshift's outputs ask
for transparent huge pages, torch's do not, so the two sides pay differently).
*reused* (rows "eager, reused"): the steady state of a process whose allocator keeps
and reuses its memory (as jemalloc/tcmalloc or a long training run with
``MALLOC_MMAP_MAX_=0`` would): ``mallopt`` switches mmap off, trimming off and pads
the heap, so after warm-up neither side pays a page fault and the kernels alone are
compared. The reused rows run after all fresh ones (mallopt cannot be fully undone).
Shapes whose tensors stay under 1 MB get no reused row (glibc reuses them anyway).

With ``--compile`` both layers also run under torch.compile (covshift then takes its
plain graph path: inductor fuses it; the native kernels are for eager mode).

The native extension builds at first use; the header line reports how long that took
(``--fresh-build`` compiles into an empty cache to measure the compile itself).

    python benchmarks/norm_speed.py                  # eager, the machine's threads
    python benchmarks/norm_speed.py --threads 1 2    # one table per thread count
    python benchmarks/norm_speed.py --quick          # fewer repeats
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import covshift.nn as cn
from covshift.models import build_mlp
from covshift.nn import _native, backend


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple
    shape: tuple[int, ...]

    @property
    def label(self) -> str:
        args = ", ".join(map(str, self.args))
        return f"{self.name}({args})"


CASES = [
    Case("BatchNorm2d", (64,), (64, 64, 32, 32)),
    Case("GroupNorm", (32, 64), (64, 64, 32, 32)),
    Case("InstanceNorm2d", (64,), (64, 64, 32, 32)),
    Case("LayerNorm", (768,), (64, 256, 768)),
    Case("RMSNorm", (768,), (64, 256, 768)),
    # Small shapes, where per-call overhead rules: Ioffe's MLP layer.
    Case("BatchNorm1d", (100,), (60, 100)),
    Case("LayerNorm", (100,), (60, 100)),
]
CONTENDERS = ("torch", "native", "pure", "ref")


@contextlib.contextmanager
def _contender(key: str) -> Iterator[None]:
    """covshift's path for ``key``: the native kernels on for "native" only, and the
    reference Function forced (no chunked pieces) for "ref"."""
    force = backend.force("reference") if key == "ref" else contextlib.nullcontext()
    with _native.use_native(key == "native"), force:
        yield


@dataclass
class Result:
    ms: list[float] = field(default_factory=list)
    saved: int | None = None
    peak: int | None = None


# A normalization layer's forward+backward cannot move fewer than five tensors of x's
# size through memory: the forward reads x and writes y, the backward reads g and x
# and writes dx (the statistics and parameter gradients are a few values per channel).
# A copy moves two (reads x, writes the copy), so the floor is 5/2 of a copy's time,
# measured in the same run and memory regime as the layers.
FLOOR_PASSES = 5
COPY_PASSES = 2


def _layers(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module]:
    kw = {"affine": True} if case.name.startswith("InstanceNorm") else {}
    theirs = getattr(nn, case.name)(*case.args, device=device, **kw)
    ours = getattr(cn, case.name)(*case.args, device=device, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs.train(), ours.train()


def _step(layer: Callable[[torch.Tensor], torch.Tensor], params: list, x, g) -> Callable[[], None]:
    def run() -> None:
        y = layer(x)
        torch.autograd.grad(y, params, g)

    return run


def _mlp_steps(device: torch.device) -> dict[str, Callable[[], None]]:
    """One SGD step of Ioffe's MLP (3 x 100 sigmoid, BN before each sigmoid, batch 60)."""
    torch.manual_seed(0)
    ours = build_mlp(784, 10, norm="batch").to(device).train()
    models = {
        "torch": cn.convert(copy.deepcopy(ours), to="torch", on_drop="ignore"),
        "native": ours,
        "pure": copy.deepcopy(ours),
        "ref": copy.deepcopy(ours),
    }
    # A fixed pool of batches, cycled: each model sees the same sequence, so that the
    # three stay numerically alike as they train (no one drifts into denormals alone).
    xs = torch.rand(16, 60, 784, device=device)
    targets = torch.randint(0, 10, (16, 60), device=device)
    steps = {}
    for key, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        counter = [0]

        def run(
            model: nn.Module = model, opt: torch.optim.Optimizer = opt, i: list[int] = counter
        ) -> None:
            k = i[0] = (i[0] + 1) % len(xs)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xs[k]), targets[k]).backward()
            opt.step()

        steps[key] = run
    return steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_bytes(run_forward: Callable[[], object]) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_forward()
    return sum(storages.values())


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null meanwhile.

    The profiler's C++ side (kineto) writes "USDT: ... profiler_start/stop" lines
    straight to fd 2, past Python's sys.stderr and past any log-level setting; they
    would land in the middle of the table.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _peak_bytes(run: Callable[[], None], device: torch.device) -> int | None:
    """Peak of bytes allocated above the starting point while ``run`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    try:
        with (
            _quiet_fd2(),
            torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as prof,
        ):
            run()
        # Each event's own (not its children's) allocations, net of its frees: put
        # growth at its start and shrinkage at its end, then take the running maximum.
        steps = []
        for e in prof.events():
            n = e.self_cpu_memory_usage
            if n:
                steps.append((e.time_range.start if n > 0 else e.time_range.end, n))
        live = peak = 0
        for _, n in sorted(steps):
            live += n
            peak = max(peak, live)
        return peak
    except Exception:  # the profiler's event format is not a stable API
        return None


def _timed(
    runs: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    results: dict[str, Result],
) -> None:
    """Interleaved samples of every contender; each sample lasts >= ~5 ms."""
    inner = {}
    for key, run in runs.items():
        with _contender(key):
            for _ in range(3):  # warm-up (and compile)
                run()
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            once = time.perf_counter() - start
        inner[key] = max(1, min(2000, int(5e-3 / max(once, 1e-7))))
    n = max(inner.values())  # the same count for all: equal exposure to noise
    # Short steps get more (cheap) samples: on a shared machine one preempted sample
    # moves a small median a lot.
    if n > 1:
        repeats *= 4
    for _ in range(repeats):
        for key, run in runs.items():
            with _contender(key):
                _sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    run()
                _sync(device)
                results[key].ms.append((time.perf_counter() - start) * 1e3 / n)


def measure_case(
    case: Case, device: torch.device, repeats: int, compiled: bool
) -> dict[str, Result]:
    if compiled:
        # Every torch.compile(module) call enters Dynamo through one shared wrapper frame,
        # whose cache would fill up across rows (recompile_limit, 8 entries: thread
        # counts, shapes and layer types each add one) and then run later rows eagerly,
        # for one side or both. A fresh Dynamo cache per row compiles both sides alike.
        torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(case.shape, device=device, requires_grad=True)
    g = torch.randn(case.shape, device=device)
    theirs, ours = _layers(case, device)
    runs: dict[str, Callable[[], None]] = {}
    results: dict[str, Result] = {}
    for key in CONTENDERS if not compiled else ("torch", "native"):
        layer = theirs if key == "torch" else ours
        fn = torch.compile(layer) if compiled else layer
        runs[key] = _step(fn, [x, *layer.parameters()], x, g)
        with _contender(key):
            results[key] = Result(
                saved=_saved_bytes(lambda fn=fn: fn(x)), peak=_peak_bytes(runs[key], device)
            )
    _timed(runs, device, repeats, results)
    dst = torch.empty_like(x)
    copy = {"torch": Result()}
    _timed({"torch": lambda: dst.copy_(x)}, device, repeats, copy)
    results["floor"] = Result(ms=[t * FLOOR_PASSES / COPY_PASSES for t in copy["torch"].ms])
    return results


def _reuse_memory() -> bool:
    """Make glibc keep and reuse freed memory (no mmap, no trim, 1 GB heap padding).

    Returns False where libc has no ``mallopt`` (not glibc): no reused rows then.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    return all(
        mallopt(opt, val) == 1
        for opt, val in ((m_mmap_max, 0), (m_trim_threshold, 1 << 40), (m_top_pad, 1 << 30))
    )


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _table(title: str) -> Table:
    table = Table(title=title)
    for col in ("layer", "input", "mode"):
        table.add_column(col)
    for col in (
        "torch ms",
        "native ms",
        "pure ms",
        "ref ms",
        "native/torch",
        "pure/torch",
        "pure/ref",
        "n/t min",
        "floor ms",
        "native/floor",
        "saved MB t/n/p/r",
        "peak MB t/n/p/r",
    ):
        table.add_column(col, justify="right")
    return table


def _ratio(num: Result | None, den: Result) -> str:
    if num is None:
        return "-"
    r = statistics.median(num.ms) / statistics.median(den.ms)
    style = "green" if r <= 1.0 else "red"
    return f"[{style}]{r:.2f}[/{style}]"


def _median_ratio(num: Result, den: Result) -> float:
    return statistics.median(num.ms) / statistics.median(den.ms)


def _row(table: Table, label: str, shape: str, mode: str, res: dict[str, Result]) -> None:
    t, n, p, f = res["torch"], res.get("native"), res.get("pure"), res.get("floor")
    r = res.get("ref")

    def ms(c: Result | None) -> str:
        if c is None:
            return "-"
        med = statistics.median(c.ms)
        return f"{med * 1e3:.0f} us" if med < 1 else f"{med:.2f}"

    def mem(attr: str) -> str:
        return " / ".join(_mb(getattr(c, attr)) if c else "-" for c in (t, n, p, r))

    table.add_row(
        label,
        shape,
        mode,
        ms(t),
        ms(n),
        ms(p),
        ms(r),
        _ratio(n, t),
        _ratio(p, t),
        "-" if p is None or r is None else f"{_median_ratio(p, r):.2f}",
        "-" if n is None else f"{min(n.ms) / min(t.ms):.2f}",
        ms(f),
        "-" if n is None or f is None else f"{_median_ratio(n, f):.1f}",
        mem("saved"),
        mem("peak"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats")
    parser.add_argument("--repeats", type=int, default=15, help="timed samples per contender")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--only", nargs="*", help="layer names to run (default: all)")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP training step")
    parser.add_argument("--threads", type=int, nargs="*", help="torch.set_num_threads values")
    parser.add_argument("--fresh-build", action="store_true", help="compile into an empty cache")
    parser.add_argument(
        "--memory",
        choices=("fresh", "reused", "both"),
        default="both",
        help="eager rows with fresh pages, with glibc reusing memory, or both (see above)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    console = Console(width=200)
    if args.fresh_build:
        os.environ["COVSHIFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="covshift-ext-")
    device = torch.device(args.device)
    repeats = 5 if args.quick else args.repeats
    start = time.perf_counter()
    with _native.use_native(True):
        ok = _native.available()
    took = time.perf_counter() - start
    what = "compiled" if args.fresh_build else "built or loaded from cache"
    console.print(
        f"native extension: {'ready' if ok else 'UNAVAILABLE (native = pure)'}, "
        f"{what} in {took:.1f} s (cache: {_native.cache_dir()})"
    )
    thread_counts = args.threads or [torch.get_num_threads()]
    cases = [c for c in CASES if not args.only or c.name in args.only]
    modes = [False, True] if args.compile else [False]
    # rows[threads] = [(label, shape, mode, results)], filled fresh first, then reused.
    rows: dict[int, list[tuple[str, str, str, dict[str, Result]]]] = {t: [] for t in thread_counts}

    def run_cases(threads: int, reused: bool) -> None:
        torch.set_num_threads(threads)
        for case in cases:
            big = torch.Size(case.shape).numel() * 4 >= 2**20
            for compiled in modes if not reused else ([False] if big else []):
                res = measure_case(case, device, repeats, compiled)
                mode = "compile" if compiled else "eager, reused" if reused else "eager"
                rows[threads].append((case.label, "x".join(map(str, case.shape)), mode, res))
                ratio = statistics.median(res["native"].ms) / statistics.median(res["torch"].ms)
                console.log(f"{threads}T {case.label} {mode}: native/torch {ratio:.2f}")
        if not args.no_mlp and not reused:
            results = {k: Result() for k in CONTENDERS}
            _timed(_mlp_steps(device), device, repeats, results)
            rows[threads].append(("Ioffe MLP SGD step", "60x784, 3x100+BN", "eager", results))

    if args.memory in ("fresh", "both"):
        for threads in thread_counts:
            run_cases(threads, reused=False)
    if args.memory in ("reused", "both") and device.type == "cpu":
        if _reuse_memory():
            for threads in thread_counts:
                run_cases(threads, reused=True)
        else:
            console.print("no mallopt (not glibc): no reused-memory rows")
    for threads in thread_counts:
        table = _table(
            f"forward+backward, {device}, {threads} thread(s), median of {repeats} interleaved "
            f"samples (torch {torch.__version__})"
        )
        for row in rows[threads]:
            _row(table, *row)
        console.print(table)


if __name__ == "__main__":
    main()
