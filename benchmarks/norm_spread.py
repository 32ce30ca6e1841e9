"""Call-by-call spread of covshift's normalization layers against torch.nn's.

``norm_speed.py`` reports medians of samples that each run a step many times; a kernel
that is fast on average but slow for runs of calls in a row (a thread pool that falls
asleep, a page-fault storm, a cache thrashed by a bad split) hides in them. Here every
forward+backward call (``y = layer(x); autograd.grad(y, [x, *params], g)``) is timed on
its own, torch.nn and covshift's native path alternating call by call in one process,
and the table gives the percentiles, the longest call, and how many calls took more
than twice the contender's own median, and the longest run of such calls in a row.

    python benchmarks/norm_spread.py                         # GroupNorm, 1 and 2 threads
    python benchmarks/norm_spread.py --only BatchNorm2d GroupNorm --calls 500
    python benchmarks/norm_spread.py --memory reused         # glibc keeps freed memory
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from covshift.nn import _native

# Run as a script, this folder is on sys.path: the cases and the layers' setup are
# norm_speed's, so that the two benchmarks time the same layers.
from norm_speed import CASES, Case, _layers, _reuse_memory

WARMUP = 10  # calls per contender left out: first-touch faults, thread-pool start


def longest_slow_run(times: list[float], limit: float) -> int:
    """The most consecutive calls slower than ``limit``."""
    best = run = 0
    for t in times:
        run = run + 1 if t > limit else 0
        best = max(best, run)
    return best


def time_calls(case: Case, calls: int, progress: Progress) -> dict[str, list[float]]:
    torch.manual_seed(0)
    x = torch.randn(case.shape, requires_grad=True)
    g = torch.randn(case.shape)
    theirs, ours = _layers(case, torch.device("cpu"))
    layers = {"torch": theirs, "covshift native": ours}
    times: dict[str, list[float]] = {k: [] for k in layers}
    task = progress.add_task(case.label, total=calls + WARMUP)
    with _native.use_native(True):
        for i in range(calls + WARMUP):
            for key, layer in layers.items():
                start = time.perf_counter()
                y = layer(x)
                torch.autograd.grad(y, [x, *layer.parameters()], g)
                elapsed = (time.perf_counter() - start) * 1e3
                del y
                if i >= WARMUP:
                    times[key].append(elapsed)
            progress.advance(task)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["GroupNorm"], help="layer names")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per contender")
    parser.add_argument("--memory", choices=("fresh", "reused"), default="fresh")
    args = parser.parse_args(argv)
    console = Console(width=150)
    if not _native.available():
        console.print("native extension unavailable: nothing to compare")
        return
    if args.memory == "reused" and not _reuse_memory():
        console.print("no mallopt (not glibc): cannot run the reused regime")
        return
    # Only the big shapes: a small layer's call lasts microseconds, below the timer's
    # resolution for a single call (norm_speed.py times those in repeated runs).
    cases = [c for c in CASES if c.name in args.only and torch.Size(c.shape).numel() >= 2**18]
    if not cases:
        big = sorted({c.name for c in CASES if torch.Size(c.shape).numel() >= 2**18})
        parser.error(f"--only {' '.join(args.only)}: no big-shape case; choose from {big}")
    table = Table(
        title=f"forward+backward, call by call ({args.calls} calls each, alternating; "
        f"{args.memory} memory; torch {torch.__version__})"
    )
    for col in ("layer", "threads", "contender", "p10 ms", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("layer", "contender") else "right")
    for col in ("max ms", "calls > 2x p50", "longest such run"):
        table.add_column(col, justify="right")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for case in cases:
                for key, times in time_calls(case, args.calls, progress).items():
                    q = statistics.quantiles(times, n=100)
                    median = statistics.median(times)
                    slow = sum(t > 2 * median for t in times)
                    table.add_row(
                        case.label,
                        str(threads),
                        key,
                        *(f"{q[i]:.2f}" for i in (9, 49, 89, 98)),
                        f"{max(times):.2f}",
                        f"{slow}/{len(times)}",
                        str(longest_slow_run(times, 2 * median)),
                    )
    console.print(table)


if __name__ == "__main__":
    main()
