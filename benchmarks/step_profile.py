"""Where one training step's time goes, per preset network, before and after batching.

For the first point of every network of each preset (its quick size, or ``--size``),
the cost of each part of a point's run, spread over its steps (ms per step: a part
done every ``n`` steps costs a ``1/n`` share):

- ``train``: the training step (one at a time: :func:`covshift.training.train`'s step;
  batched: a member's share of the batched step, ``K = --members``);
- ``eval``: the evaluation on the point's test examples (batched: a member's share);
- ``records``: the probe's records (eval and train mode, the noise floor), taken on
  the member's own network in both cases;
- ``ICS``, ``smooth``: gradient ICS and landscape smoothness, where the preset asks;
- ``ckpt``: saving the checkpoint at each evaluation;
- ``store``: writing one evaluation's scalars and one record's rows into the store;
- ``sync``: batched only: copying a member out of the batched model for its records,
  evaluations and checkpoints.

The last columns are the one-at-a-time and batched totals per step and their ratio.
Every figure is the fastest of a few timed repetitions; on a shared machine they are
noisy.

    python benchmarks/step_profile.py
    python benchmarks/step_profile.py --only depth santurkar2018 --members 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from covshift.batched import stack_models
from covshift.batched.evaluate import evaluate_members, gather_rows, member_losses
from covshift.batched.optim import MemberSGD, SGDSettings
from covshift.batched.slots import NotBatchable
from covshift.checkpoints import FileCheckpointer
from covshift.experiments import load_config
from covshift.experiments.battery import BATTERY
from covshift.experiments.grid import Point, expand_grid
from covshift.experiments.members import batch_key
from covshift.experiments.point import StoreSink, build_model, dataset_for, point_measures
from covshift.losses import loss_function
from covshift.probe import GradientICSMonitor, ShiftProbe, SmoothnessMonitor
from covshift.store import Store
from covshift.training import TrainConfig, TrainState, evaluate


def _best(fn: Callable[[], object], repeats: int = 5, inner: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def _profile(point: Point, members: int, tmp: Path) -> dict[str, float]:
    spec = point.spec
    data = dataset_for(spec).first_test(spec.test_examples)
    model = build_model(spec.model, data, spec.seed)
    opt = torch.optim.SGD(model.parameters(), lr=spec.optimizer.lr)
    loss_fn = loss_function(data)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(len(data.x_train), (spec.batch_size,), generator=gen)
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out: dict[str, float] = {"train": _best(step, inner=max(1, 2000 // spec.batch_size))}
    evals = spec.steps // spec.eval_every + 2
    per_eval = evals / spec.steps
    out["eval"] = _best(lambda: evaluate(model, data.x_test, data.y_test), 3) * per_eval
    store = Store(tmp / f"{point.id}.db")
    run = store.start_run(point.name, config={}, seed=spec.seed)
    sink = StoreSink(store, run)
    config = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, seed=spec.seed)
    state = TrainState(model, opt, data, config, torch.device("cpu"), step=0)
    measures = point_measures(spec, model, data, sink, background=False)
    out["records"] = out["ICS"] = out["smooth"] = 0.0
    for m in measures:
        if isinstance(m, ShiftProbe):
            records = len(m.schedule.steps or []) or spec.steps // m.schedule.every + 1
            with m:
                out["records"] += _best(lambda m=m: m.record_now(0), 3) * records / spec.steps
        elif isinstance(m, GradientICSMonitor | SmoothnessMonitor):
            key = "ICS" if isinstance(m, GradientICSMonitor) else "smooth"
            x, y = data.x_train[: spec.probe.measure_batch or spec.batch_size], None
            y = data.y_train[: len(x)]
            count = spec.steps // m.schedule.every + 1
            out[key] += _best(lambda m=m, x=x, y=y: m.measure(state, x, y), 2) * count / spec.steps
    keeper = FileCheckpointer(tmp / f"{point.id}.pt")
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}
    out["ckpt"] = _best(lambda: keeper.save(payload), 3) * per_eval
    metrics = {"test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 1.0}
    out["store"] = _best(lambda: sink.scalars(0, metrics), 3) * per_eval
    store.close()
    out["total"] = sum(out.values())
    # Batched: a member's share of the step and of the evaluation, plus its copy out.
    try:
        stacked = stack_models(
            [build_model(spec.model, data, spec.seed + i) for i in range(members)]
        )
    except NotBatchable:  # (a transformer): its points run one at a time
        return out
    stacked.use_generators([torch.Generator().manual_seed(i) for i in range(members)])
    slots = stacked.parameter_slots()
    sgd = MemberSGD(
        [s.tensor for _, s in slots],
        [SGDSettings(spec.optimizer.lr)] * members,
        [[n in t for t in stacked.trainable] for n, _ in slots],
    )

    def batched_step() -> None:
        idx = torch.randint(len(data.x_train), (members, spec.batch_size), generator=gen)
        x = gather_rows(data.x_train, idx if stacked.members_first else idx.t())
        losses = member_losses(stacked.model(x), gather_rows(data.y_train, idx), data.is_regression)
        sgd.zero_grad()
        losses.sum().backward()
        sgd.step()

    inner = max(1, 2000 // (spec.batch_size * members))
    train_b = _best(batched_step, inner=inner) / members
    if stacked.members_first:
        eval_b = (
            _best(
                lambda: evaluate_members(stacked.model, members, True, data.x_test, data.y_test),
                3,
            )
            / members
            * per_eval
        )
    else:  # convolutional members evaluate one at a time, each its own network
        eval_b = out["eval"]
    # A member is copied out at every evaluation and every probe record.
    sync_count = per_eval + 1 / spec.probe.every
    sync = _best(lambda: stacked.copy_out(0, model), 5, 20) * sync_count
    batched = {
        "train": train_b,
        "eval": eval_b,
        "sync": sync,
        **{k: out[k] for k in ("records", "ICS", "smooth", "ckpt", "store")},
    }
    out["batched"] = sum(batched.values())
    out["b_train"], out["b_eval"], out["sync"] = train_b, eval_b, sync
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="quick", choices=("quick", "full"))
    parser.add_argument("--only", nargs="+", choices=BATTERY, default=list(BATTERY))
    parser.add_argument("--members", type=int, default=8, help="K of the batched columns")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(
        title=f"ms per step of one point ({args.size} size, {args.threads} thread; "
        f"batched: K = {args.members})"
    )
    cols = ["preset / network", "train", "eval", "records", "ICS", "smooth", "ckpt", "store"]
    cols += ["1-at-a-time", "batched train", "batched eval", "sync", "batched", "ratio"]
    for col in cols:
        table.add_column(col, justify="left" if col.startswith("preset") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.only:
            config = load_config(preset, size=args.size)
            seen: set[str | None] = set()
            for point in expand_grid(config):
                key = batch_key(point.spec)
                shape = (point.network, point.spec.batch_size, point.spec.model.depth)
                if (key is not None and key in seen) or str(shape) in seen:
                    continue  # (a network that cannot batch has no key: its shape decides)
                seen |= {str(shape)} | ({key} if key is not None else set())
                found = _profile(point, args.members, Path(tmp))
                ms = {k: f"{v * 1e3:.3f}" for k, v in found.items()}
                ms.update({k: "-" for k in ("b_train", "b_eval", "sync", "batched") if k not in ms})
                ratio = f"{found['total'] / found['batched']:.1f}x" if "batched" in found else "-"
                table.add_row(
                    f"{preset} / {point.network} " + ",".join(f"{v}" for v in point.axes.values()),
                    *(ms[k] for k in ("train", "eval", "records", "ICS", "smooth", "ckpt")),
                    ms["store"],
                    ms["total"],
                    ms["b_train"],
                    ms["b_eval"],
                    ms["sync"],
                    ms["batched"],
                    ratio,
                )
                Console(stderr=True).print(f"profiled {preset} / {point.name}", style="dim")
    Console(width=240).print(table)


if __name__ == "__main__":
    main()
