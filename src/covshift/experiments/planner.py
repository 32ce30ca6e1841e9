"""The planner: how many members each batch gets, and how the batches share the
workers, so that the grid finishes soonest within the machine's memory.

For every set of points that may share a batch (:func:`covshift.experiments.members.
batch_key`) the planner has the measured seconds of one batched step and evaluation at
``K = 1, 2, 4, 8, ...`` (:mod:`covshift.experiments.member_costs`). A batch of ``K``
members costs::

    steps x step(K) + evaluations x evaluation(K) + the members' own records,
    gradient-ICS and smoothness measurements (one member at a time)

It starts every set at the ``K`` of highest throughput (members per second), spreads
the batches over the workers longest first, and while the longest worker's longest
batch would finish sooner cut smaller (more batches for idle workers), it cuts it
smaller. Only the sizes it timed are candidates (no extrapolation past them). It
never falls back to the one-at-a-time path on its own, even where its estimate says
that would be faster: which numbers a point records (equal within the stated
tolerance, not bit for bit, for BatchNorm networks) must not depend on how busy the
machine was when the planner timed it. ``--members N``
fixes ``K = N`` instead (``--members 1``: every point alone, the one-at-a-time path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from covshift.data import DatasetError
from covshift.experiments.costs import Cost, spread_seconds
from covshift.experiments.grid import Point
from covshift.experiments.member_costs import MemberCosts, time_members
from covshift.experiments.members import batch_key, split_evenly
from covshift.experiments.point import dataset_for

__all__ = ["MemberPlan", "describe_plan", "estimate_groups", "group_seconds", "plan_members"]

MAX_MEMBERS = 16  # the largest K the planner times (more members rarely pay more)


@dataclass(frozen=True)
class MemberPlan:
    """The batches to run, longest first, and what the planner knew.

    Attributes:
        groups: the batches.
        batched: whether they train through the batched path (a batch of one point
            too, so that its numbers do not depend on its company); False with
            ``members=1``: every point alone, the one-at-a-time path.
        sizes: the K chosen per batch key.
        seconds: the estimated wall time on the planned workers.
        costs: the measurements per batch key.
        notes: networks that train one at a time, and why.
    """

    groups: list[list[Point]]
    batched: bool = True
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    costs: dict[str, MemberCosts] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def backend_groups(self) -> list[list[Point]] | None:
        """What a backend's ``run`` takes as ``groups``: the batches, or None for the
        one-at-a-time path."""
        return self.groups if self.batched else None


def _measurement_seconds(point: Point, cost: Cost) -> float:
    """The point's own records and measurements (everything but steps and evaluations)."""
    spec = point.spec
    evals = spec.steps // spec.eval_every + 2 if spec.eval_every else 2
    return cost.of(point) - spec.steps * cost.step - evals * cost.evaluation


def group_seconds(
    group: Sequence[Point], costs: Mapping[str, Cost], member_costs: MemberCosts | None
) -> float:
    """Estimated seconds of one batch (module docstring)."""
    first = group[0]
    if member_costs is None or member_costs.why_alone:  # trains one at a time
        return sum(costs[p.id].of(p) for p in group)
    spec = first.spec
    k = len(group)
    evals = spec.steps // spec.eval_every + 2 if spec.eval_every else 2
    shared = spec.steps * member_costs.at(member_costs.step, k)
    shared += evals * member_costs.at(member_costs.evaluation, k)
    return shared + sum(_measurement_seconds(p, costs[p.id]) for p in group)


def estimate_groups(
    groups: Sequence[Sequence[Point]], seconds: Sequence[float], lanes: int
) -> float:
    """Wall time of ``groups`` (``seconds`` each) spread over ``lanes`` workers
    (:func:`~covshift.experiments.costs.spread_seconds`)."""
    return spread_seconds(seconds, lanes)


def _powers(limit: int) -> list[int]:
    out, k = [], 2
    while k <= limit:
        out.append(k)
        k *= 2
    if limit > 1 and limit not in out and limit <= MAX_MEMBERS:
        out.append(limit)
    return sorted(out)


def plan_members(
    points: Sequence[Point],
    costs: Mapping[str, Cost],
    *,
    lanes: int,
    threads: int,
    members: int | None = None,
    resumed: Mapping[str, tuple[str, ...]] | None = None,
) -> MemberPlan:
    """Batches for ``points`` (see the module docstring); ``costs`` are the preflight's
    per point, ``lanes`` the workers, ``threads`` torch threads per worker, ``members``
    a fixed K (None: the planner chooses), ``resumed`` the batches that points resuming
    from a checkpoint were saved in (:func:`~covshift.experiments.members.
    recorded_batches`): they train in those again, in that order."""
    if members == 1:
        seconds = [group_seconds([p], costs, None) for p in points]
        groups = [[p] for _, p in sorted(zip(seconds, points, strict=True), key=_longest)]
        return MemberPlan(groups, False, seconds=estimate_groups(groups, seconds, lanes))
    by_key: dict[str, list[Point]] = {}
    alone: list[list[Point]] = []
    again = _recorded_groups(points, resumed or {})
    kept = {p.id for g in again for p in g}
    for point in points:
        key = batch_key(point.spec)
        if point.id in kept:
            continue
        if key is None:
            alone.append([point])
        else:
            by_key.setdefault(key, []).append(point)
    measured: dict[str, MemberCosts] = {}
    notes: list[str] = []
    for key, chosen in by_key.items():
        if len(chosen) < 2:
            continue
        first = chosen[0]
        try:
            data = dataset_for(first.spec)
        except DatasetError:  # the preflight has said so already
            continue
        cap = members if members is not None else min(MAX_MEMBERS, len(chosen))
        ks = [cap] if members is not None else _powers(cap)
        cost = costs[first.id]
        found = time_members(
            first, data, threads, ks, one=(cost.step, cost.evaluation), lanes=lanes
        )
        measured[key] = found
        if found.why_alone:
            notes.append(f"{first.network}: trains one point at a time ({found.why_alone})")
    fixed = [group_seconds(g, costs, None) for g in [*alone, *again]]
    sizes = _choose_sizes(by_key, costs, measured, lanes, members, fixed)
    groups = [*alone, *again]
    for key, chosen in by_key.items():
        order = sorted(chosen, key=lambda p: (*_settings(p), p.position))
        groups += _split(order, sizes.get(key, 1), measured.get(key), members)
    seconds = [group_seconds(g, costs, measured.get(batch_key(g[0].spec) or "")) for g in groups]
    ranked = sorted(zip(seconds, range(len(groups)), strict=True), reverse=True)
    ordered = [groups[i] for _, i in ranked]
    total = estimate_groups(ordered, [s for s, _ in ranked], lanes)
    return MemberPlan(ordered, True, sizes, total, measured, notes)


def _split(
    points: Sequence[Point], size: int, found: MemberCosts | None, members: int | None
) -> list[list[Point]]:
    """``points`` (one batch key's) in batches of about ``size`` (:func:`split_evenly`),
    and, where the planner chose the size, no batch of one while the set holds two or
    more points and two fit in memory: fewer, larger batches instead.

    A member alone in its batch trains to other bits than in any batch of two or more
    (a grouped convolution of one group, a BatchNorm over one member's channels, take
    other code paths in torch), while in a batch of two or more it trains to the same
    bits whichever points share it (measured on every network of the battery that
    batches). So the planner, whose sizes follow timings, must not leave a point alone
    on one run and in company on the next: its numbers would depend on how busy the
    machine was. ``--members N`` (``members``) is a fixed choice and kept as given."""
    groups = split_evenly(points, size)
    lone = members is None and len(points) >= 2 and any(len(g) == 1 for g in groups)
    if not lone or found is None or found.why_alone:
        return groups
    largest = math.ceil(len(points) / (len(points) // 2))
    if largest > found.max_members:  # two or more do not fit: a lone batch it is
        return groups
    return split_evenly(points, largest)


def _longest(item: tuple[float, Point]) -> tuple[float, int]:
    return (-item[0], item[1].position)


def _recorded_groups(
    points: Sequence[Point], resumed: Mapping[str, tuple[str, ...]]
) -> list[list[Point]]:
    """The batches resuming points were saved in, in their order (members that ended
    meanwhile left out); a point whose batch names points of another key trains in
    a new batch instead."""
    by_id = {p.id: p for p in points}
    groups: dict[tuple[str, ...], list[Point]] = {}
    for batch in dict.fromkeys(resumed.values()):
        group = [by_id[i] for i in batch if i in by_id and resumed.get(i) == batch]
        keys = {batch_key(p.spec) for p in group}
        if group and len(keys) == 1 and None not in keys:
            groups[batch] = group
    return list(groups.values())


def _settings(point: Point) -> tuple[float, float, float]:
    o = point.spec.optimizer
    return (o.lr, o.momentum, o.weight_decay)


def _candidates(n: int, found: MemberCosts | None, members: int | None) -> list[int]:
    if found is None or found.why_alone:
        return [1]
    limit = min(n, found.max_members)
    if members is not None:
        return [max(1, min(members, limit))]
    # Only sizes that were timed: a batch past the largest K measured would be priced
    # by extrapolating a line, which a step's cost need not follow.
    return sorted({1, *(k for k in found.step if k <= limit)})


def _choose_sizes(
    by_key: Mapping[str, list[Point]],
    costs: Mapping[str, Cost],
    measured: Mapping[str, MemberCosts],
    lanes: int,
    members: int | None,
    fixed: Sequence[float],
) -> dict[str, int]:
    options = {
        key: _candidates(len(pts), measured.get(key), members) for key, pts in by_key.items()
    }

    def batches(key: str, k: int) -> list[float]:
        pts = sorted(by_key[key], key=lambda p: (*_settings(p), p.position))
        found = measured.get(key)
        return [group_seconds(g, costs, found) for g in _split(pts, k, found, members)]

    def work(key: str, k: int) -> float:
        return sum(batches(key, k))

    # Highest throughput first (least total work; among equals, more batches).
    sizes = {key: min(opts, key=lambda k: (work(key, k), k)) for key, opts in options.items()}

    def makespan(chosen: Mapping[str, int]) -> float:
        everything = [*fixed, *(s for key, k in chosen.items() for s in batches(key, k))]
        return estimate_groups([[None]] * len(everything), everything, lanes)  # type: ignore[list-item]

    best = makespan(sizes)
    # Cut the longest batch's set smaller while the grid does not finish later (ties
    # accepted: the next set's cut may be what shortens it).
    while True:
        key = max(sizes, key=lambda k: max(batches(k, sizes[k])), default=None)
        smaller = [k for k in options.get(key, []) if key is not None and k < sizes[key]]
        if key is None or not smaller:
            break
        trial = {**sizes, key: max(smaller)}
        span = makespan(trial)
        if span > best + 1e-12:
            break
        sizes, best = trial, span
    return sizes


def describe_plan(plan: MemberPlan) -> str:
    """``12 points in 4 batches of 3`` (or ``... of 1-5``), for the run's first line."""
    sizes = [len(g) for g in plan.groups]
    if not sizes:
        return "nothing to run"
    points = sum(sizes)
    if max(sizes) == 1:
        return f"{points} point{'s' * (points != 1)} one at a time"
    span = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    return f"{points} points in {len(sizes)} batch{'es' * (len(sizes) != 1)} of {span}"
