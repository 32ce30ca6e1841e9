"""Members as one batched model: training steps per second per member, against the
one-at-a-time step, per preset network.

For each network of the battery's presets (each distinct batched shape the presets
train at ``--size``, named ``preset / network``), in one run of this script and
interleaved (so that a busy machine slows every row alike):

- ``1-at-a-time``: the step :func:`covshift.training.train` takes (gather the batch,
  forward, loss, backward, ``torch.optim.SGD`` step), ms per step;
- ``K = 1, 2, 4, 8, 16``: one step of the batched model of K members
  (:mod:`covshift.batched`: gather, forward, per-member losses, backward, the
  members' SGD), ms per member and step, and the speed-up over one at a time;
- ``vmap K=8``: the other candidate, ``torch.func.stack_module_state`` + ``vmap`` +
  ``functional_call`` over the same K members (only where it runs: covshift.nn's norm
  layers are autograd Functions without a vmap rule);
- ``floor``: the network's multiply-adds per training step (forward, weight
  gradients, input gradients but the first layer's), those of fully connected layers
  at the GEMM throughput and those of convolutions at the 3x3 convolution throughput
  measured on this machine in the same run, ms per member; ``x floor``: the best
  batched time over the floor (how far the step is from what the arithmetic needs);
- ``MB K=16``: the peak a batched step of 16 members holds (parameters, gradients,
  momentum and the tensors saved for the backward).

Every figure is the fastest of ``--repeats`` timed blocks (the least disturbed by
other processes); still, on a shared machine treat them as noisy and compare rows
of one run only.

    python benchmarks/ensemble_speed.py                      # 1 and 2 threads
    python benchmarks/ensemble_speed.py --threads 1 --only depth ioffe2015
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from covshift.batched import NotBatchable, stack_models
from covshift.batched.evaluate import gather_rows, member_losses
from covshift.batched.optim import MemberSGD, SGDSettings
from covshift.experiments import load_config
from covshift.experiments.battery import BATTERY
from covshift.experiments.config import ModelSpec
from covshift.experiments.grid import Point, expand_grid
from covshift.experiments.members import batch_key
from covshift.experiments.point import build_model, dataset_for
from covshift.losses import loss_function


def preset_networks(presets: list[str], size: str) -> dict[str, tuple[Point, Any]]:
    """``preset / network`` -> the first point of each distinct batched shape of the
    presets at ``size`` (points of one :func:`batch_key` share a batched model)."""
    found: dict[str, tuple[Point, Any]] = {}
    seen: set[str] = set()
    for preset in presets:
        for point in expand_grid(load_config(preset, size=size)):
            key = batch_key(point.spec) or point.spec.model.model_dump_json()
            if key in seen:
                continue
            seen.add(key)
            # the grid axes that may change its shape (a model field, the batch size)
            axes = {k: v for k, v in point.axes.items() if not k.startswith("optimizer")}
            name = f"{preset} / {point.network}"
            if axes:
                name += " " + ",".join(f"{k.removeprefix('model.')}={v}" for k, v in axes.items())
            found[name] = (point, None)
    return found


KS = (1, 2, 4, 8, 16)


def _macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Multiply-adds of one training step on ``x`` (forward, weight gradients, and
    input gradients of every layer but the first), of fully connected layers and of
    convolutions."""
    found: list[tuple[str, int]] = []

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(m, nn.Linear):
            found.append(("linear", out.numel() * m.in_features))
        elif isinstance(m, nn.Conv2d):
            per = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            found.append(("conv", out.numel() * per))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    totals = {"linear": 0, "conv": 0}
    for i, (kind, macs) in enumerate(found):
        totals[kind] += (2 if i == 0 else 3) * macs
    return totals["linear"], totals["conv"]


def _throughput(shapes: list[tuple[int, ...]], op: Callable, macs: Callable) -> float:
    best = 0.0
    for shape in shapes:
        args = op(shape)
        for _ in range(3):
            args()
        reps = max(1, int(1e8 / macs(shape)))
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                args()
            best = max(best, 2 * macs(shape) * reps / (time.perf_counter() - start))
    return best


def _gemm_throughput() -> float:
    """FLOP/s of this machine's float32 GEMM (the best of shapes the networks use)."""

    def op(shape: tuple[int, ...]) -> Callable[[], object]:
        m, k, n = shape
        a, b = torch.randn(m, k), torch.randn(k, n)
        return lambda: a @ b

    shapes = [(60, 784, 100), (128, 576, 64), (1000, 10, 10), (256, 1024, 256)]
    return _throughput(shapes, op, lambda s: s[0] * s[1] * s[2])


def _conv_throughput() -> float:
    """FLOP/s of this machine's float32 3x3 convolution (shapes of the presets' CNNs)."""

    def op(shape: tuple[int, ...]) -> Callable[[], object]:
        n, c, o, hw = shape
        x, w = torch.randn(n, c, hw, hw), torch.randn(o, c, 3, 3)
        return lambda: torch.nn.functional.conv2d(x, w, padding=1)

    shapes = [(32, 8, 16, 14), (128, 16, 32, 14), (128, 32, 32, 7)]
    return _throughput(shapes, op, lambda s: s[0] * s[2] * s[3] * s[3] * s[1] * 9)


def _single_step(spec: ModelSpec, data: Any, batch: int) -> Callable[[], None]:
    model = build_model(spec, data, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = loss_function(data)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(len(data.x_train), (batch,), generator=gen)
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _batched_step(spec: ModelSpec, data: Any, batch: int, k: int) -> Callable[[], None]:
    stacked = stack_models([build_model(spec, data, s) for s in range(k)])
    stacked.use_generators([torch.Generator().manual_seed(s) for s in range(k)])
    slots = stacked.parameter_slots()
    opt = MemberSGD(
        [s.tensor for _, s in slots],
        [SGDSettings(0.01)] * k,
        [[name in t for t in stacked.trainable] for name, _ in slots],
    )
    gen = torch.Generator().manual_seed(0)
    regression = data.is_regression

    def step() -> None:
        idx = torch.randint(len(data.x_train), (k, batch), generator=gen)
        x = gather_rows(data.x_train, idx if stacked.members_first else idx.t())
        losses = member_losses(stacked.model(x), gather_rows(data.y_train, idx), regression)
        opt.zero_grad()
        losses.sum().backward()
        opt.step()

    return step


def _vmap_step(spec: ModelSpec, data: Any, batch: int, k: int) -> Callable[[], None] | None:
    """The torch.func candidate; None where it cannot run these layers."""
    from torch.func import functional_call, stack_module_state, vmap

    models = [build_model(spec, data, s) for s in range(k)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    loss_fn = loss_function(data)

    def one(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(base, (p, b), (x,)), y)

    gen = torch.Generator().manual_seed(0)
    tensors = list(params.values())

    def step() -> None:
        idx = torch.randint(len(data.x_train), (k, batch), generator=gen)
        losses = vmap(one)(params, buffers, data.x_train[idx], data.y_train[idx])
        for t in tensors:
            t.grad = None
        losses.sum().backward()
        with torch.no_grad():
            for t in tensors:
                t.add_(t.grad, alpha=-0.01)

    try:
        step()
    except Exception:  # covshift.nn's autograd Functions have no vmap rule
        return None
    return step


def _saved_megabytes(step: Callable[[], None], params: list[torch.Tensor]) -> float:
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    held = sum(3 * p.numel() * p.element_size() for p in params)  # weights, grads, buffers
    return (saved[0] + held) / 2**20


def _time(steps: dict[str, Callable[[], None]], members: dict[str, int], repeats: int) -> dict:
    for fn in steps.values():  # allocations, kernel choices
        fn()
        fn()
    budget = {}
    for name, fn in steps.items():
        start = time.perf_counter()
        fn()
        one = time.perf_counter() - start
        budget[name] = max(1, int(0.05 / max(one, 1e-5)))
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():  # interleaved: every row sees the same load
            n = budget[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / n / members[name])
    return best


def run(
    networks: dict[str, tuple[Point, Any]], threads: int, repeats: int, console: Console
) -> None:
    torch.set_num_threads(threads)
    gemm, conv = _gemm_throughput(), _conv_throughput()
    table = Table(
        title=f"ms per member and step, {threads} thread{'s' * (threads > 1)} (GEMM "
        f"{gemm / 1e9:.0f}, 3x3 conv {conv / 1e9:.0f} GFLOP/s measured; fastest of "
        f"{repeats} blocks; load {os.getloadavg()[0]:.1f})"
    )
    for col in ("network", "batch", "MACs", "floor", "1-at-a-time", *(f"K={k}" for k in KS)):
        table.add_column(col, justify="left" if col == "network" else "right")
    for col in ("vmap K=8", "x floor", "MB K=16"):
        table.add_column(col, justify="right")
    for name, (point, _) in networks.items():
        spec, batch = point.spec.model, point.spec.batch_size
        data = dataset_for(point.spec)
        steps = {"1": _single_step(spec, data, batch)}
        members = {"1": 1}
        try:
            for k in KS:
                steps[f"K={k}"] = _batched_step(spec, data, batch, k)
                members[f"K={k}"] = k
        except NotBatchable as e:
            console.print(f"{name}: no batched form ({e})")
        vmapped = _vmap_step(spec, data, batch, 8)
        if vmapped is not None:
            steps["vmap"], members["vmap"] = vmapped, 8
        best = _time(steps, members, repeats)
        single = build_model(spec, data, 0)
        linear, convs = _macs(single, data.x_train[:batch])
        floor = 2 * linear / gemm + 2 * convs / conv
        one = best["1"]
        batched = [best[f"K={k}"] for k in KS if f"K={k}" in best]
        memory = "n/a"
        if "K=16" in steps:
            stacked = stack_models([build_model(spec, data, s) for s in range(16)])
            held = _saved_megabytes(steps["K=16"], list(stacked.model.parameters()))
            memory = f"{held:.0f}"
        table.add_row(
            name,
            str(batch),
            f"{(linear + convs) / 1e6:.1f}M",
            f"{floor * 1e3:.3f}",
            f"{one * 1e3:.3f}",
            *(
                f"{best[f'K={k}'] * 1e3:.3f} ({one / best[f'K={k}']:.1f}x)"
                if f"K={k}" in best
                else "-"
                for k in KS
            ),
            f"{best['vmap'] * 1e3:.3f}" if "vmap" in best else "n/a",
            f"{min(batched, default=one) / floor:.1f}",
            memory,
        )
        console.print(f"measured {name}", style="dim")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", default="quick", choices=("quick", "full"))
    parser.add_argument("--only", nargs="+", choices=BATTERY, default=list(BATTERY))
    parser.add_argument("--network", nargs="+", help="only these networks (names as shown)")
    args = parser.parse_args()
    console = Console(width=240)
    networks = preset_networks(args.only, args.size)
    if args.network:
        networks = {
            n: v for n, v in networks.items() if any(w in n.split(" / ")[1] for w in args.network)
        }
    for threads in args.threads:
        run(networks, threads, args.repeats, console)


if __name__ == "__main__":
    main()
