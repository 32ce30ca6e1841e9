"""Forward+backward time and memory of covshift's normalization layers against torch.nn's.

Each row builds the torch.nn layer and covshift's with the same state, then times
``y = layer(x); autograd.grad(y, [x, *params], g)`` for both, *interleaved* (torch,
covshift, torch, ...) so that background load hits both alike, and reports medians
and their ratio covshift / torch (below 1.0: covshift is faster); with
torch.compile both layers are compiled, and "vs torch eager" compares compiled covshift
with torch.nn's eager layer (what a user switching to covshift + compile gets). Memory columns:
bytes autograd saves for backward (``saved_tensors_hooks``, distinct storages) and
the peak of tensor bytes allocated during forward+backward above what was live
before (CPU: from the profiler's per-op memory records, an approximation that cannot
see inside a single kernel; CUDA: ``max_memory_allocated``).

    python benchmarks/norm_speed.py            # eager and torch.compile
    python benchmarks/norm_speed.py --quick    # fewer repeats, eager only
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import covshift.nn as cn


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
]


@dataclass
class Result:
    ms: list[float]
    saved: int
    peak: int | None


def _layers(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module]:
    theirs = getattr(nn, case.name)(*case.args, device=device)
    ours = getattr(cn, case.name)(*case.args, device=device)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours.train(), theirs.train()


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    params = [x, *layer.parameters()]

    def run() -> None:
        y = layer(x)
        torch.autograd.grad(y, params, g)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


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
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
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


def measure(
    case: Case,
    device: torch.device,
    repeats: int,
    compile_mode: bool,
) -> tuple[Result, Result]:
    torch.manual_seed(0)
    x = torch.randn(case.shape, device=device, requires_grad=True)
    g = torch.randn(case.shape, device=device)
    ours, theirs = _layers(case, device)
    runs, results = [], []
    for layer in (theirs, ours):
        fn = torch.compile(layer) if compile_mode else layer
        run = _step(fn, x, g)
        for _ in range(3):  # warm-up (and compile)
            run()
        _sync(device)
        runs.append(run)
        results.append(Result([], _saved_bytes(fn, x), _peak_bytes(run, device)))
    for _ in range(repeats):
        for run, res in zip(runs, results, strict=True):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            res.ms.append((time.perf_counter() - start) * 1e3)
    return results[0], results[1]


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats, eager only")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per layer")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--only", nargs="*", help="layer names to run (default: all)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 5 if args.quick else args.repeats
    modes = [False] if (args.quick or args.no_compile) else [False, True]
    console = Console(width=150)
    table = Table(
        title=f"forward+backward, {device}, {torch.get_num_threads()} threads, "
        f"median of {repeats} (torch {torch.__version__})"
    )
    for col in ("layer", "input", "mode", "torch ms", "covshift ms", "ratio"):
        table.add_column(col, justify="left" if col in ("layer", "input", "mode") else "right")
    table.add_column("vs torch eager", justify="right")
    for col in ("saved MB torch/ours", "peak MB torch/ours"):
        table.add_column(col, justify="right")
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        eager_torch_ms = float("nan")
        for compiled in modes:
            theirs, ours = measure(case, device, repeats, compiled)
            t_ms, o_ms = statistics.median(theirs.ms), statistics.median(ours.ms)
            if not compiled:
                eager_torch_ms = t_ms
            ratio = o_ms / t_ms
            style = "green" if ratio <= 1.0 else "red"
            table.add_row(
                case.label,
                "x".join(map(str, case.shape)),
                "compile" if compiled else "eager",
                f"{t_ms:.2f}",
                f"{o_ms:.2f}",
                f"[{style}]{ratio:.2f}[/{style}]",
                f"{o_ms / eager_torch_ms:.2f}",
                f"{_mb(theirs.saved)} / {_mb(ours.saved)}",
                f"{_mb(theirs.peak)} / {_mb(ours.peak)}",
            )
            console.log(f"{case.label} {'compile' if compiled else 'eager'}: ratio {ratio:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
