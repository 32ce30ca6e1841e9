"""Check `covshift run ioffe2015` against an independent plain-PyTorch run of the same setup.

The reference below shares no code with covshift: it reads the IDX files with gzip and
numpy, builds the nets as nn.Sequential with torch.nn.BatchNorm1d, initializes with
torch.manual_seed + nn.init.normal_, draws batches with its own permutations, and
computes the percentiles and the drift with numpy. Both are run for several seeds;
the table compares the means of each headline number with the spread over seeds
(|difference| / combined standard error: below ~2 means agreement within seed noise).

    python benchmarks/ioffe_reference.py [--seeds 3] [--steps 50000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CHECKPOINTS = (1000, 5000, 10000)


def read(name: str) -> np.ndarray:
    raw = gzip.decompress((FMNIST / f"{name}.gz").read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def reference_run(norm: bool, seed: int, steps: int) -> dict:
    x = torch.tensor(read("train-images-idx3-ubyte").reshape(-1, 784) / 255.0, dtype=torch.float32)
    y = torch.tensor(read("train-labels-idx1-ubyte").astype(np.int64))
    xt = torch.tensor(read("t10k-images-idx3-ubyte").reshape(-1, 784) / 255.0, dtype=torch.float32)
    yt = torch.tensor(read("t10k-labels-idx1-ubyte").astype(np.int64))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width_in = 784
    for _ in range(3):
        linear = nn.Linear(width_in, 100, bias=not norm)
        nn.init.normal_(linear.weight, 0.0, 0.1)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.BatchNorm1d(100)] if norm else [linear]
        layers.append(nn.Sigmoid())
        width_in = 100
    head = nn.Linear(100, 10)
    nn.init.normal_(head.weight, 0.0, 0.1)
    nn.init.zeros_(head.bias)
    net = nn.Sequential(*layers, head)
    last_sigmoid = layers[-1]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(seed + 1000)
    captured: list[np.ndarray] = []
    last_sigmoid.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().numpy()))
    percentiles: list[np.ndarray] = []
    acc: dict[int, float] = {}

    def measure(step: int) -> None:
        net.eval()
        with torch.no_grad():
            if step % 500 == 0 or step == steps:
                acc[step] = (net(xt).argmax(1) == yt).float().mean().item()
            captured.clear()
            net(xt[:1000])
            percentiles.append(np.percentile(captured[-1], [15, 50, 85], axis=0))
        captured.clear()
        net.train()

    perm, pos = torch.randperm(60000, generator=gen), 0
    measure(0)
    for step in range(1, steps + 1):
        if pos + 60 > 60000:
            perm, pos = torch.randperm(60000, generator=gen), 0
        idx = perm[pos : pos + 60]
        pos += 60
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            measure(step)
    q = np.stack(percentiles)  # (R, 3, U)
    width = (q[:, 2] - q[:, 0]).mean(0)
    drift = float((np.abs(q[-1] - q[0]).mean(0) / np.maximum(width, 1e-12)).mean())
    out = {str(c): acc.get(c) for c in CHECKPOINTS}
    out["final"] = acc[steps]
    return {"acc": out, "drift_last": drift}


def covshift_run(seed: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "covshift.cli",
                "run",
                "ioffe2015",
                "--seed",
                str(seed),
                "--steps",
                str(steps),
                "--json",
                "--quiet",
                "--db",
                f"{tmp}/c.db",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    summary = json.loads(proc.stdout)["networks"]
    return {
        key: {
            "acc": summary[key]["test_accuracy"],
            "drift_last": summary[key]["drift"]["hidden.2.act"],
        }
        for key in ("baseline", "batchnorm")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50_000)
    args = parser.parse_args()
    console = Console()
    ours: dict[str, list[dict]] = {"baseline": [], "batchnorm": []}
    ref: dict[str, list[dict]] = {"baseline": [], "batchnorm": []}
    for seed in range(args.seeds):
        console.print(f"seed {seed}: covshift ...")
        result = covshift_run(seed, args.steps)
        for key in ours:
            ours[key].append(result[key])
        console.print(f"seed {seed}: plain PyTorch reference ...")
        ref["baseline"].append(reference_run(False, seed, args.steps))
        ref["batchnorm"].append(reference_run(True, seed, args.steps))
    table = Table(
        title=f"ioffe2015 vs independent plain PyTorch, {args.seeds} seeds, "
        f"{args.steps} steps (mean ± std over seeds)"
    )
    for col in ("network", "number", "covshift", "reference", "|diff| / s.e."):
        table.add_column(col, justify="left" if col in ("network", "number") else "right")
    metrics = [
        (f"acc@{c}", lambda r, c=c: r["acc"].get(c)) for c in [*map(str, CHECKPOINTS), "final"]
    ] + [("drift hidden.2", lambda r: r["drift_last"])]
    for key in ours:
        for name, get in metrics:
            a = [get(r) for r in ours[key]]
            b = [get(r) for r in ref[key]]
            if any(v is None for v in a + b):
                continue
            sa = statistics.stdev(a) if len(a) > 1 else 0.0
            sb = statistics.stdev(b) if len(b) > 1 else 0.0
            se = math.sqrt((sa**2 + sb**2) / len(a)) or float("nan")
            z = abs(statistics.mean(a) - statistics.mean(b)) / se
            table.add_row(
                key,
                name,
                f"{statistics.mean(a):.4f} ± {sa:.4f}",
                f"{statistics.mean(b):.4f} ± {sb:.4f}",
                f"{z:.2f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
