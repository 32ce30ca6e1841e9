"""Evaluation of K members: one batched forward against K plain evaluations.

For each network of the named presets (quick size), K members are stacked as the
batched loop stacks them and evaluated on the first 1,000 test images both ways, in
the same process, twice (the second, warm, pass is reported):

- ``batched``: :func:`covshift.batched.evaluate.evaluate_members`, one forward of the
  stacked model (for convolutional members: one grouped convolution of K groups);
- ``one by one``: :func:`covshift.training.evaluate` of each member's own network.

The batched loop evaluates convolutional members one by one and fully connected ones
batched (``covshift.batched.trainer``); this is the measurement behind that choice.

    python benchmarks/member_eval.py norm-scopes santurkar2018 depth --members 8
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from covshift.batched.evaluate import evaluate_members
from covshift.batched.models import stack_models
from covshift.experiments.config_files import load_config
from covshift.experiments.grid import expand_grid
from covshift.experiments.point import build_model, dataset_for
from covshift.training import evaluate

EXAMPLES = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = args.members
    table = Table(
        title=f"ms to evaluate {k} members on {EXAMPLES:,} test images, {args.threads} thread(s)"
    )
    for col in ("preset / network", "layout", "batched", "one by one", "batched / one by one"):
        table.add_column(col, justify="left" if col.startswith("preset") else "right")
    for preset in args.presets:
        seen: set[str] = set()
        for point in expand_grid(load_config(preset, size="quick")):
            if point.network in seen:
                continue
            seen.add(point.network)
            data = dataset_for(point.spec, torch.device("cpu"))
            models = [build_model(point.spec.model, data, seed) for seed in range(k)]
            stacked = stack_models(models)
            x, y = data.x_test[:EXAMPLES], data.y_test[:EXAMPLES]
            for _ in range(2):  # the first pass pays for allocations
                start = time.perf_counter()
                evaluate_members(stacked.model, k, stacked.members_first, x, y)
                batched = time.perf_counter() - start
                start = time.perf_counter()
                for model in models:
                    evaluate(model, x, y)
                single = time.perf_counter() - start
            table.add_row(
                f"{preset} / {point.network}",
                "rows (fully connected)" if stacked.members_first else "channels (conv)",
                f"{batched * 1e3:.1f}",
                f"{single * 1e3:.1f}",
                f"{batched / single:.2f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
