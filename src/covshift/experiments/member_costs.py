"""What a batch of ``K`` members costs: one batched step and one batched evaluation of
a grid's network, timed at ``K = 2, 4, 8, ...`` (the preflight times ``K = 1``).

The members timed are the network built with ``K`` seeds and stacked, trained for a
few steps by the batched step itself (gather, forward, per-member losses, backward,
the members' SGD) and evaluated on a sample of the test set, on a throwaway copy: the
same work as :mod:`covshift.batched.trainer` does per step, without the callbacks
(records, gradient ICS and smoothness cost what they cost one member at a time, and
the preflight times them).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from covshift.batched.evaluate import evaluate_each, gather_rows, member_losses
from covshift.batched.models import stack_models
from covshift.batched.optim import MemberSGD, SGDSettings
from covshift.batched.slots import NotBatchable
from covshift.data import Dataset
from covshift.experiments.grid import Point
from covshift.experiments.model_size import available_bytes, model_size
from covshift.experiments.point import build_model
from covshift.training import resolve_device

__all__ = ["MemberCosts", "time_members"]

_EVAL_SAMPLE = 500  # test examples evaluated for timing; scaled to the test set


@dataclass(frozen=True)
class MemberCosts:
    """Measured seconds of one batched step and one batched full evaluation, by ``K``
    (``K = 1``: a batch of one); ``max_members``: the most
    members the device's memory holds; ``why_alone``: why the network cannot be
    batched (None when it can)."""

    step: dict[int, float] = field(default_factory=dict)
    evaluation: dict[int, float] = field(default_factory=dict)
    max_members: int = 1
    why_alone: str | None = None

    def at(self, table: dict[int, float], k: int) -> float:
        """``table`` at ``k``: measured, or linear between (beyond) the nearest two."""
        if k in table:
            return table[k]
        known = sorted(table)
        if len(known) == 1:
            return table[known[0]] * k / known[0]
        lo = max((m for m in known if m < k), default=known[0])
        hi = min((m for m in known if m > k), default=known[-1])
        if lo == hi:  # beyond the last: the last two's slope
            lo, hi = known[-2], known[-1]
        slope = (table[hi] - table[lo]) / (hi - lo)
        return max(table[lo] + slope * (k - lo), 0.0)


def _memory_limit(point: Point, data: Dataset, lanes: int) -> int:
    spec = point.spec
    size = model_size(spec.model, data.num_features, data.num_classes, data.image_shape)
    need = max(size.training_bytes(spec.batch_size), 1)
    free = available_bytes(resolve_device(spec.device))
    if free is None:
        return 64
    # Half of what is free, shared by the workers, and a margin of 4x over the bound
    # (the bound counts weights and one float per unit; the step holds more).
    return max(1, int(free / 2 / max(lanes, 1) / (4 * need)))


def time_members(
    point: Point,
    data: Dataset,
    threads: int,
    ks: list[int],
    *,
    one: tuple[float, float],
    lanes: int = 1,
) -> MemberCosts:
    """Time ``point``'s network batched at each ``K`` of ``ks`` and at ``K = 1`` (a
    batch of one, which is how a batchable point left alone trains: it may cost more
    than the one-at-a-time step); ``one``: its step and evaluation one at a time, as the
    preflight measured them, which stand for ``K = 1`` where nothing is timed."""
    spec = point.spec
    costs = MemberCosts({1: one[0]}, {1: one[1]}, _memory_limit(point, data, lanes))
    chosen = [k for k in ks if 2 <= k <= costs.max_members]
    if not chosen:
        return costs
    chosen = [1, *chosen]
    device = resolve_device(spec.device)
    data = data.first_test(spec.test_examples)
    if data.x_train.device != device:
        data = data.to(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in chosen:
            try:
                step, evaluation = _time_at(point, data, k)
            except NotBatchable as e:
                return MemberCosts(costs.step, costs.evaluation, 1, str(e))
            except (MemoryError, RuntimeError):  # out of memory: this K is too many
                break
            costs.step[k] = step
            costs.evaluation[k] = evaluation
    finally:
        torch.set_num_threads(previous)
    return costs


def _time_at(point: Point, data: Dataset, k: int) -> tuple[float, float]:
    spec = point.spec
    models = [
        build_model(spec.model, data, spec.seed + i).to(data.x_train.device) for i in range(k)
    ]
    stacked = stack_models(models)
    model = stacked.model
    slots = stacked.parameter_slots()
    optimizer = MemberSGD(
        [s.tensor for _, s in slots],
        [SGDSettings(spec.optimizer.lr, spec.optimizer.momentum, spec.optimizer.weight_decay)] * k,
        [[name in t for t in stacked.trainable] for name, _ in slots],
    )
    generator = torch.Generator().manual_seed(spec.seed)
    stacked.use_generators(
        [torch.Generator(device=data.x_train.device).manual_seed(i) for i in range(k)]
    )
    regression = data.is_regression
    x_train, y_train = data.x_train, data.y_train

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            idx = torch.randint(len(x_train), (k, spec.batch_size), generator=generator)
            idx = idx.to(x_train.device)
            x = gather_rows(x_train, idx if stacked.members_first else idx.t())
            losses = member_losses(model(x), gather_rows(y_train, idx), regression)
            optimizer.zero_grad()
            if losses.requires_grad:
                losses.sum().backward()
            optimizer.step()
        return (time.perf_counter() - start) / n

    steps(1)  # allocations, kernel choices
    block = max(1, 8 // k)
    step = statistics.fmean(steps(block) for _ in range(3))  # a run pays for hiccups too
    sample = min(_EVAL_SAMPLE, len(data.x_test))
    start = time.perf_counter()
    x_test, y_test = data.x_test[:sample], data.y_test[:sample]
    evaluate_each(stacked, models.__getitem__, range(k), x_test, y_test)
    evaluation = (time.perf_counter() - start) * len(data.x_test) / sample
    return step, evaluation
