"""Sweep throughput: one grid run by each backend, each from an empty store.

Rows (all on the same grid, measured in one run of this script):

- ``local, 1 worker x 1 thread`` and ``x 2 threads``: points one after another in
  the driver process (the default for one worker is every core to torch);
- ``local, 2 workers x 1 thread``: two worker processes (the default on 2 cores);
- ``ray``: Ray tasks of one CPU on a local Ray instance (started and shut down);
- ``plain loop``: one ``covshift run`` invocation per point, one after another, with
  the default threads (each pays the interpreter, torch and dataset start-up, as a
  shell loop would).

For each row: wall-clock seconds of the whole command(s), and the seconds inside the
sweep (``seconds`` of ``--json``: from the first point's start to the last one's end).
The ratios are throughput ratios (points per second) on the same grid. Run it on a
quiet machine: a second busy process distorts multi-process figures badly.

    python benchmarks/sweep_speed.py                   # Fashion-MNIST if installed
    python benchmarks/sweep_speed.py --dataset synthetic --steps 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from covshift.data import DEFAULT_FASHION_MNIST_DIR

GRID = """
name = "sweep-speed"
title = "sweep throughput benchmark"
dataset = "{dataset}"
seeds = {seeds}
steps = {steps}
batch_size = 60
eval_every = 500
[model]
width = 100
depth = 3
activation = "sigmoid"
[probe]
every = 100
examples = 1000
[sweep]
optimizer.lr = {lrs}
[networks.baseline]
label = "Without BN"
norm = "none"
[networks.batchnorm]
label = "With BN"
norm = "batch"
"""

ONE_POINT = """
name = "sweep-speed"
title = "one point"
dataset = "{dataset}"
seeds = [{seed}]
steps = {steps}
batch_size = 60
eval_every = 500
[model]
width = 100
depth = 3
activation = "sigmoid"
[optimizer]
lr = {lr}
[probe]
every = 100
examples = 1000
[networks.{network}]
label = "{network}"
norm = "{norm}"
"""


def _covshift(args: list[str], cwd: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "covshift.cli", "run", *args, "--json", "--quiet"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"covshift run {' '.join(args)} failed:\n{proc.stderr}")
    return wall, json.loads(proc.stdout)


def _grid_row(folder: Path, extra: list[str]) -> tuple[float, float]:
    wall, summary = _covshift([str(folder / "grid.toml"), "--db", "c.db", *extra], folder)
    return wall, summary["seconds"]


def _plain_loop(folder: Path, args: argparse.Namespace, lrs: list[float]) -> tuple[float, float]:
    total = inside = 0.0
    for seed in range(args.seeds):
        for lr in lrs:
            for network, norm in (("baseline", "none"), ("batchnorm", "batch")):
                path = folder / f"{network}-{lr}-{seed}.toml"
                path.write_text(
                    ONE_POINT.format(
                        dataset=args.dataset,
                        seed=seed,
                        steps=args.steps,
                        lr=lr,
                        network=network,
                        norm=norm,
                    )
                )
                wall, summary = _covshift([str(path), "--db", "c.db"], folder)
                total += wall
                inside += summary["seconds"]
    return total, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = (
        "fashion-mnist"
        if (DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
        else "synthetic"
    )
    parser.add_argument("--dataset", default=default)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lrs", default="0.1,0.5,2.0")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-loop", action="store_true")
    args = parser.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]
    points = 2 * len(lrs) * args.seeds
    rows: dict[str, list[tuple[float, float]]] = {}
    modes: list[tuple[str, list[str] | None]] = [
        ("local, 1 worker x 1 thread", ["--workers", "1", "--threads", "1"]),
        ("local, 1 worker x 2 threads", ["--workers", "1", "--threads", "2"]),
        ("local, 2 workers x 1 thread", ["--workers", "2", "--threads", "1"]),
    ]
    if not args.no_ray:
        modes.append(("ray, tasks of 1 CPU", ["--backend", "ray"]))
    if not args.no_loop:
        modes.append(("plain loop of covshift run", None))
    for _ in range(args.repeats):
        for name, extra in modes:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                (folder / "grid.toml").write_text(
                    GRID.format(
                        dataset=args.dataset,
                        seeds=args.seeds,
                        steps=args.steps,
                        lrs=json.dumps(lrs),
                    )
                )
                row = _plain_loop(folder, args, lrs) if extra is None else _grid_row(folder, extra)
            rows.setdefault(name, []).append(row)
            print(f"  {name}: {row[0]:.1f} s wall, {row[1]:.1f} s in the sweep", flush=True)
    walls = {k: statistics.median(w for w, _ in v) for k, v in rows.items()}
    insides = {k: statistics.median(s for _, s in v) for k, v in rows.items()}
    one = "local, 1 worker x 1 thread"
    one_two = "local, 1 worker x 2 threads"
    two = "local, 2 workers x 1 thread"
    print(f"\n{points} points ({args.dataset}, {args.steps} steps each), median of {args.repeats}:")
    print(f"{'row':32} {'wall s':>8} {'sweep s':>8} {'points/min':>11}")
    for name in walls:
        print(
            f"{name:32} {walls[name]:8.1f} {insides[name]:8.1f} {60 * points / walls[name]:11.1f}"
        )
    ratios = [
        ("2 workers x 1 / 1 worker x 1 thread", one, two),
        ("2 workers x 1 / 1 worker x 2 threads", one_two, two),
        ("ray / local 2 workers", two, "ray, tasks of 1 CPU"),
        ("2 workers / plain loop", "plain loop of covshift run", two),
        ("1 worker x 2 threads / plain loop", "plain loop of covshift run", one_two),
    ]
    print("\nthroughput ratios (wall-clock, start-up included; in brackets: inside the sweep)")
    for label, slow, fast in ratios:
        if slow in walls and fast in walls:
            print(
                f"  {label:38} {walls[slow] / walls[fast]:.2f}x "
                f"({insides[slow] / insides[fast]:.2f}x)"
            )
    alone, together = _ceiling(args)
    print(
        f"\nthe machine's ceiling: one 1-thread training process alone {alone:.2f} s, two at "
        f"once {together:.2f} s each -> at most {2 * alone / together:.2f}x from 2 workers"
    )


_TRAIN = """
import sys, time, torch
torch.set_num_threads(1)
from covshift.data import load_dataset
from covshift.models import build_mlp
from covshift.training import TrainConfig, train
data = load_dataset(sys.argv[1])
net = build_mlp(data.num_features, data.num_classes, norm="batch", seed=0)
start = time.perf_counter()
train(net, data, TrainConfig(steps=int(sys.argv[2]), eval_every=500), device="cpu")
print(time.perf_counter() - start)
"""


def _ceiling(args: argparse.Namespace) -> tuple[float, float]:
    """Seconds of one point's training in one process alone, and in each of two
    processes running at once (memory bandwidth and caches are shared)."""
    command = [sys.executable, "-c", _TRAIN, args.dataset, str(args.steps)]

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    alone = float(start().communicate()[0])
    pair = [start(), start()]
    together = statistics.mean(float(p.communicate()[0]) for p in pair)
    return alone, together


if __name__ == "__main__":
    main()
