"""Which points of a grid can train together as members of one batched model, and
the batches they form.

Members of one batch train in lockstep through one batched network, so they must share
everything that fixes the network's shapes and the loop's schedule: the dataset (and
its folder, and the test examples evaluated), the device, the steps, the batch size,
the evaluation interval and the model's fields other than its initialization and its
frozen layers (:func:`batch_key`). Their seeds, learning rates, momentum, weight decay,
initializations, frozen layers, probes and divergence rules are their own.

A batch lists its members sorted by their optimizer settings (then grid order), so
that a learning-rate sweep's members with one rate are neighbours (one optimizer run
each, :mod:`covshift.batched.optim`), and is cut into batches of at most ``K`` members
of near-equal size (:func:`group_points`). Points that resume from a checkpoint go back
into the batch they were saved in (:func:`recorded_batches`): a member's last bits may
depend on its company (a grouped conv's kernels depend on the group count), so the
resumed run continues with the company it had.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from covshift.checkpoint_files import read_checkpoint
from covshift.experiments.grid import Point, PointSpec
from covshift.store import NoStoreError, RunInfo, Store

__all__ = ["BATCHED_KINDS", "batch_key", "group_points", "recorded_batches", "split_evenly"]

# Model kinds with a batched form (covshift.batched.models); others train alone.
BATCHED_KINDS = frozenset({"mlp", "linear", "cnn", "vgg"})


def batch_key(spec: PointSpec) -> str | None:
    """What the members of one batch share, as a string; None for a point that trains
    alone (a model kind without a batched form, or an optimizer other than plain SGD:
    :class:`~covshift.batched.MemberSGD` is SGD with momentum, weight decay and the
    run's learning-rate decay, no warmup)."""
    if spec.model.kind not in BATCHED_KINDS:
        return None
    if spec.optimizer.kind != "sgd" or spec.optimizer.warmup_steps:
        return None
    model = spec.model.model_dump(mode="json", exclude={"init", "init_std", "freeze"})
    return json.dumps(
        {
            "dataset": spec.dataset,
            "data_dir": spec.data_dir,
            "device": spec.device,
            "steps": spec.steps,
            "decay": spec.optimizer.decay,
            "batch_size": spec.batch_size,
            "eval_every": spec.eval_every,
            "test_examples": spec.test_examples,
            "model": model,
        },
        sort_keys=True,
    )


def _order(point: Point) -> tuple[float, float, float, int]:
    o = point.spec.optimizer
    return (o.lr, o.momentum, o.weight_decay, point.position)


def split_evenly(items: Sequence[Point], size: int) -> list[list[Point]]:
    """``items`` in consecutive batches of at most ``size``, as equal as they can be."""
    if not items:
        return []
    count = math.ceil(len(items) / max(1, size))
    base, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        n = base + (1 if i < extra else 0)
        out.append(list(items[start : start + n]))
        start += n
    return out


def group_points(points: Sequence[Point], members: int | Mapping[str, int]) -> list[list[Point]]:
    """``points`` as batches: those of one :func:`batch_key` together, sorted by their
    optimizer settings, in batches of at most ``members`` (a mapping: per key; a key
    it does not name, and points without a key, train alone). Batches come in the
    order their first point has in ``points``."""
    by_key: dict[str, list[Point]] = {}
    alone: list[list[Point]] = []
    order: list[tuple[int, list[Point]]] = []
    for point in points:
        key = batch_key(point.spec)
        if key is None:
            alone.append([point])
            continue
        by_key.setdefault(key, []).append(point)
    groups: list[list[Point]] = [*alone]
    for key, chosen in by_key.items():
        size = members if isinstance(members, int) else members.get(key, 1)
        groups += split_evenly(sorted(chosen, key=_order), size)
    position = {p.id: i for i, p in enumerate(points)}
    for group in groups:
        order.append((min(position[p.id] for p in group), group))
    return [g for _, g in sorted(order, key=lambda item: item[0])]


def recorded_batches(
    points: Sequence[Point], runs: Mapping[str, RunInfo], store_path: str | os.PathLike[str]
) -> dict[str, tuple[str, ...]]:
    """Point id -> the batch (point ids, in order) its last checkpoint was saved in, for
    the ``points`` that resume from one (``runs``: their recorded runs)."""
    resuming = [(p, runs[p.id]) for p in points if p.id in runs]
    if not resuming or not Path(store_path).is_file():
        return {}
    found: dict[str, tuple[str, ...]] = {}
    try:
        store = Store(store_path, create=False)
    except NoStoreError:
        return {}
    with store:
        for point, run in resuming:
            try:  # only a verified file is read; the run sets a rejected one aside
                verified = read_checkpoint(store.checkpoint_path(run.id))
                if verified is None:
                    continue
                payload = torch.load(
                    io.BytesIO(verified[0]), map_location="cpu", weights_only=False
                )
            except Exception:  # rejected or unreadable: the run says so when it resumes
                continue
            batch = payload.get("batch") if isinstance(payload, dict) else None
            if batch:
                found[point.id] = tuple(str(b) for b in batch)
    return found
