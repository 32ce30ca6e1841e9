"""Step throughput of covshift's training loop against a plain hand-written PyTorch loop.

Same model (the Ioffe & Szegedy MLP, with and without BN, built by covshift's
builder), same data (Fashion-MNIST if installed, else synthetic), same batches, same
SGD; the two loops alternate over several repeats and the median time per step is
compared as a ratio measured in the same run (ratio > 1: covshift is slower).
covshift's loop runs with evaluation only at the start and the end (two passes over
the test set, included in its time), without a probe; `--probe` adds the default
probe (every 100 steps on 1,000 examples) to show what probing costs.

    python benchmarks/loop_speed.py [--steps 3000] [--repeats 5] [--probe]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from covshift.data import BatchSampler, Dataset, DatasetError, load_dataset
from covshift.models import build_mlp
from covshift.probe import ShiftProbe
from covshift.training import TrainConfig, train


def plain_loop(data: Dataset, norm: str, steps: int) -> float:
    """The loop a user writes by hand; returns seconds per step."""
    net = build_mlp(784, 10, norm=norm, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sampler = BatchSampler(len(data.x_train), 60, seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = sampler.next()
        loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def covshift_loop(data: Dataset, norm: str, steps: int, probe: bool) -> float:
    net = build_mlp(784, 10, norm=norm, seed=0)
    config = TrainConfig(steps=steps, batch_size=60, lr=0.5, eval_every=0, seed=0)
    callbacks = []
    if probe:
        callbacks.append(ShiftProbe(net, ["hidden.*.act"], data.x_test[:1000], every=100))
    start = time.perf_counter()
    train(net, data, config, callbacks=callbacks, device="cpu")
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe", action="store_true", help="also time the default probe")
    args = parser.parse_args()
    try:
        data = load_dataset("fashion-mnist")
    except DatasetError:
        data = load_dataset("synthetic", n_train=60000, n_test=10000)
    console = Console()
    table = Table(
        title=f"training loop, {args.steps} steps x {args.repeats} repeats, "
        f"{data.name}, {torch.get_num_threads()} threads (median)"
    )
    for col in ("model", "plain loop ms/step", "covshift ms/step", "ratio"):
        table.add_column(col, justify="right" if col != "model" else "left")
    variants = [("none", False), ("batch", False)]
    if args.probe:
        variants += [("none", True), ("batch", True)]
    for norm, probe in variants:
        plain, ours = [], []
        for _ in range(args.repeats):  # alternate so drifts in machine load hit both
            plain.append(plain_loop(data, norm, args.steps))
            ours.append(covshift_loop(data, norm, args.steps, probe))
        p, o = statistics.median(plain), statistics.median(ours)
        label = f"MLP 3x100 sigmoid, norm={norm}" + (" + probe" if probe else "")
        table.add_row(label, f"{p * 1e3:.3f}", f"{o * 1e3:.3f}", f"{o / p:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
