"""Which points batch together, what the planner chooses, and the CLI's --members:
members share what fixes their shapes and schedule and nothing else; the planner
picks K from measured costs and spreads the batches over the workers; --members 1 is
today's one-at-a-time path, number for number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covshift.experiments import load_config, run_experiment
from covshift.experiments.backends import InlineBackend
from covshift.experiments.costs import Cost
from covshift.experiments.grid import expand_grid
from covshift.experiments.member_costs import MemberCosts
from covshift.experiments.members import batch_key, group_points, split_evenly
from covshift.experiments.planner import (
    describe_plan,
    estimate_groups,
    group_seconds,
    plan_members,
)
from covshift.experiments.point import dataset_for
from covshift.store import Store

from .helpers import SMALL_SWEEP, covshift, dump, sweep_file


def _points(tmp_path: Path, text: str = SMALL_SWEEP):
    return expand_grid(load_config(str(sweep_file(tmp_path, text))))


def test_members_share_shapes_and_schedule_only(tmp_path: Path) -> None:
    points = _points(tmp_path)
    keys = {p.network: set() for p in points}
    for p in points:
        keys[p.network].add(batch_key(p.spec))
    # Seeds and learning rates never split a batch; networks of other shapes do.
    assert len(keys["plain"]) == len(keys["bn"]) == 1
    assert keys["plain"] != keys["bn"]
    spec = points[0].spec
    same = [
        spec.model_copy(update={"model": spec.model.model_copy(update={"init_std": 0.5})}),
        spec.model_copy(update={"model": spec.model.model_copy(update={"freeze": ("head",)})}),
        spec.model_copy(update={"seed": 9}),
    ]
    other = [
        spec.model_copy(update={"steps": 61}),
        spec.model_copy(update={"batch_size": 31}),
        spec.model_copy(update={"model": spec.model.model_copy(update={"width": 17})}),
        spec.model_copy(update={"test_examples": 100}),
    ]
    assert all(batch_key(s) == batch_key(spec) for s in same)
    assert all(batch_key(s) != batch_key(spec) for s in other)


def test_batches_are_sorted_by_optimizer_settings_and_split_evenly(tmp_path: Path) -> None:
    points = _points(tmp_path)
    groups = group_points(points, 4)
    assert sorted(len(g) for g in groups) == [3, 3, 3, 3, 3, 3]  # 9 per network: 3 x 3
    for g in groups:
        lrs = [p.spec.optimizer.lr for p in g]
        assert lrs == sorted(lrs) and len({p.network for p in g}) == 1
    assert [len(b) for b in split_evenly(points[:7], 3)] == [3, 2, 2]
    assert group_points(points, {}) == [[p] for p in points]  # no size: alone


def _costs(points, step: float = 1e-3) -> dict[str, Cost]:
    return {p.id: Cost(step=step, evaluation=1e-3, record=1e-3) for p in points}


def test_the_planner_takes_the_k_of_highest_throughput_and_keeps_workers_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import covshift.experiments.planner as planner

    points = _points(tmp_path)

    def measured(point, data, threads, ks, *, one, lanes):
        # A batch of K costs 1 + 0.25 (K - 1) single steps: batching pays.
        steps = {1: one[0], **{k: one[0] * (1 + 0.25 * (k - 1)) for k in ks}}
        evals = {1: one[1], **{k: one[1] * k for k in ks}}
        return MemberCosts(steps, evals, max_members=64)

    monkeypatch.setattr(planner, "time_members", measured)
    one_worker = plan_members(points, _costs(points), lanes=1, threads=1)
    assert one_worker.batched and sorted(len(g) for g in one_worker.groups) == [9, 9]
    # With 4 workers and 2 networks, cutting each network in two finishes sooner.
    four = plan_members(points, _costs(points), lanes=4, threads=1)
    whole = plan_members(points, _costs(points), lanes=4, threads=1, members=9)
    assert len(four.groups) >= 4 and four.seconds < whole.seconds
    fixed = plan_members(points, _costs(points), lanes=1, threads=1, members=2)
    assert max(len(g) for g in fixed.groups) == 2
    alone = plan_members(points, _costs(points), lanes=2, threads=1, members=1)
    assert not alone.batched and alone.backend_groups is None
    assert all(len(g) == 1 for g in alone.groups)
    assert describe_plan(alone) == "18 points one at a time"
    assert describe_plan(one_worker) == "18 points in 2 batches of 9"


def test_the_planner_leaves_no_point_alone_in_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A member alone in its batch trains to other bits than in any batch of two or
    # more, so the planner, whose sizes follow timings, never leaves one alone where
    # its set has company, even where batching does not pay: batches of one there
    # would make a point's numbers depend on the timing.
    import covshift.experiments.planner as planner

    points = _points(tmp_path)  # 9 points per network

    def measured(point, data, threads, ks, *, one, lanes, fit=64):
        steps = {1: one[0], **{k: one[0] * k * 1.5 for k in ks}}  # slower per member
        return MemberCosts(steps, {1: one[1], **{k: one[1] * k for k in ks}}, fit)

    monkeypatch.setattr(planner, "time_members", measured)
    found = plan_members(points, _costs(points), lanes=2, threads=1)
    assert found.batched and min(len(g) for g in found.groups) >= 2
    assert sorted(p.id for g in found.groups for p in g) == sorted(p.id for p in points)
    three = [p for p in points if p.network == "plain"][:3]  # 2 + 1 would leave one alone
    assert [len(g) for g in plan_members(three, _costs(three), lanes=2, threads=1).groups] == [3]
    # a fixed --members N is kept as given, and where two do not fit, one it is
    fixed = plan_members(three, _costs(three), lanes=2, threads=1, members=2)
    assert sorted(len(g) for g in fixed.groups) == [1, 2]
    monkeypatch.setattr(planner, "time_members", lambda *a, **k: measured(*a, **k, fit=1))
    tight = plan_members(three, _costs(three), lanes=2, threads=1)
    assert [len(g) for g in tight.groups] == [1, 1, 1]


def test_resumed_points_go_back_to_their_recorded_batch(tmp_path: Path) -> None:
    points = _points(tmp_path)
    plain = [p for p in points if p.network == "plain"]
    recorded = (plain[4].id, plain[0].id, "gone")
    resumed = {plain[0].id: recorded, plain[4].id: recorded}
    found = plan_members(points, _costs(points), lanes=2, threads=1, members=3, resumed=resumed)
    assert [plain[4], plain[0]] in found.groups  # in the recorded order, the gone left out
    rest = [p for g in found.groups for p in g if p.id not in {plain[0].id, plain[4].id}]
    assert len(rest) == 16


def test_estimate_spreads_batches_longest_first() -> None:
    assert estimate_groups([[1], [2], [3]], [3.0, 2.0, 2.0], lanes=2) == pytest.approx(7.0)
    assert estimate_groups([[1]], [5.0], lanes=1) == 5.0


def test_members_one_is_todays_path_number_for_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--members 1: every point through train_point (no batched code at all), with the
    numbers train_point gives it alone."""
    import torch

    import covshift.experiments.backends.base as base
    import covshift.experiments.backends.group as group

    text = SMALL_SWEEP.replace("seeds = 3", "seeds = 1").replace("[0.1, 0.5, 2.0]", "[0.5]")
    config = load_config(str(sweep_file(tmp_path, text)))
    calls = {"alone": 0}
    real = base.train_point

    def counted(*args, **kwargs):
        calls["alone"] += 1
        return real(*args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("the batched path ran with --members 1")

    monkeypatch.setattr(base, "train_point", counted)
    monkeypatch.setattr(group, "train_point_members", never)
    with Store(tmp_path / "c.db") as store:
        run_experiment(config, store, backend=InlineBackend(threads=1), members=1)
    assert calls["alone"] == 2
    got = dump(tmp_path / "c.db")

    class Sink:
        def __init__(self) -> None:
            self.rows: list = []

        def scalars(self, step: int, values: dict) -> None:
            self.rows += [(k, step, v) for k, v in values.items()]

        def probe(self, record) -> None:
            pass

        def end(self, *args, **kwargs) -> None:
            pass

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for point in expand_grid(config):
            sink = Sink()
            real(point.spec, dataset_for(point.spec), sink)
            assert sorted(sink.rows) == got[point.id][0]
    finally:
        torch.set_num_threads(previous)


def test_cli_members_option_and_plan_line(tmp_path: Path) -> None:
    path = sweep_file(tmp_path)
    one = covshift("run", str(path), "--members", "1", "--dry-run", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert "(18 points one at a time)" in one.stdout
    two = covshift("run", str(path), "--members", "2", "--dry-run", cwd=tmp_path)
    assert "18 points in 10 batches of 1-2" in two.stdout  # 9 per network: 2+2+2+2+1
    bad = covshift("run", str(path), "--members", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "--members" in bad.stderr
    run = covshift("run", str(path), "--members", "6", "--json", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert {p["status"] for p in summary["points"]} == {"finished"}


def test_a_batch_of_one_is_priced_at_the_batched_step(tmp_path: Path) -> None:
    """A batchable point left alone trains as a batch of one, whose step the planner
    times: it is priced at that step, not at the one-at-a-time one."""
    points = _points(tmp_path)
    costs = _costs(points)
    point = points[0]
    alone = group_seconds([point], costs, None)
    one = costs[point.id]
    slower = MemberCosts({1: 3 * one.step, 2: 4 * one.step}, {1: one.evaluation, 2: 0.0}, 8)
    extra = 2 * one.step * point.spec.steps
    assert group_seconds([point], costs, slower) == pytest.approx(alone + extra)
    unbatchable = MemberCosts({1: one.step}, {1: one.evaluation}, 1, why_alone="no form")
    assert group_seconds([point], costs, unbatchable) == pytest.approx(alone)
