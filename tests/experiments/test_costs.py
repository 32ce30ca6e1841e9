"""What a run costs, as the preflight measures it: the point's own optimizer, every
measurement its probe asks for, its checkpoint saves and its set-up, counted the
number of times the run does each."""

from __future__ import annotations

from pathlib import Path

import pytest

import covshift.experiments.preflight as preflight_module
from covshift.experiments import load_config
from covshift.experiments.costs import Cost
from covshift.experiments.grid import expand_grid
from covshift.experiments.preflight import preflight

from .helpers import SMALL_SWEEP, sweep_file

# One BatchNorm MLP whose probe asks for every measurement a point can run.
MEASURED = """
name = "measured"
title = "every measurement"
dataset = "synthetic"
seeds = 1
steps = 40
batch_size = 20
eval_every = 10
[model]
width = 16
norm = "batch"
[optimizer]
kind = "adamw"
lr = 0.001
[probe]
every = 20
examples = 50
gradient_ics_every = 20
smoothness_every = 40
gradient_norm_steps = [0, 10, 100]
batch_stats_every = 10
batch_stats_batches = 3
[networks.bn]
label = "BN"
"""


def test_a_points_seconds_count_every_part_as_often_as_the_run_does_it(tmp_path: Path) -> None:
    (point,) = expand_grid(load_config(str(sweep_file(tmp_path, MEASURED))))
    cost = Cost(
        step=1.0,
        evaluation=10.0,
        record=100.0,
        gradient_ics=1e3,
        smoothness=1e4,
        gradient_norm=1e5,
        batch_stats=1e6,
        checkpoint=1e7,
        setup=1e8,
        epoch=1e9,
        epoch_batches=15,
    )
    # 40 steps, 15 batches an epoch: permutations drawn at steps 0, 15 and 30;
    # evaluations at 0, 10, ..., 40 and the final one: 40 // 10 + 2 = 6, each with its
    # checkpoint; records at 0, 20, 40; ICS at 0, 20, 40; smoothness at 0, 40;
    # gradient norms at 0 and 10 (100 is past the end); batch stats at 0, 10, ..., 40.
    expected = (
        40 * 1 + 6 * (10 + 1e7) + 3 * 100 + 3 * 1e3 + 2 * 1e4 + 2 * 1e5 + 5 * 1e6 + 1e8 + 3 * 1e9
    )
    assert cost.of(point) == pytest.approx(expected)
    assert Cost(1.0, 10.0, 100.0).of(point) == pytest.approx(40 + 6 * 10 + 3 * 100)
    # an epoch that runs out exactly at the last step draws no further permutation
    assert Cost(0.0, 0.0, 0.0, epoch=1.0, epoch_batches=20).of(point) == pytest.approx(
        2 + 3 * 0 + 0
    )


def test_the_preflight_times_each_measurement_the_checkpoint_and_the_set_up(
    tmp_path: Path,
) -> None:
    config = load_config(str(sweep_file(tmp_path, MEASURED)))
    points = expand_grid(config)
    (cost,) = set(preflight(config, points, threads=1).values())
    for field in ("gradient_ics", "smoothness", "gradient_norm", "batch_stats", "checkpoint"):
        assert getattr(cost, field) > 0, field
    assert cost.setup > 0 and cost.step > 0 and cost.record > 0
    assert cost.epoch > 0
    n_train = len(preflight_module._load(points[0]).x_train)
    assert cost.epoch_batches == n_train // 20  # batch_size 20


def test_the_optimizer_is_the_points_own_and_parts_of_the_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SGD and AdamW points are timed apart (AdamW's step costs more), each with its
    # own optimizer, not with a stand-in SGD.
    text = SMALL_SWEEP.replace("[sweep]", "[sweep]\noptimizer.kind = ['sgd', 'adamw']")
    config = load_config(str(sweep_file(tmp_path, text)))
    points = expand_grid(config)
    made: list[str] = []
    real = preflight_module.config_optimizer

    def spy(params, config):
        optimizer = real(params, config)
        made.append(type(optimizer).__name__)
        return optimizer

    monkeypatch.setattr(preflight_module, "config_optimizer", spy)
    costs = preflight(config, points, threads=1)
    assert sorted(made) == ["AdamW", "AdamW", "SGD", "SGD"]  # 2 networks x 2 optimizers
    by_kind = {(p.network, p.spec.optimizer.kind): costs[p.id] for p in points}
    assert by_kind[("bn", "sgd")] is not by_kind[("bn", "adamw")]


def test_a_monitor_the_preflight_cannot_time_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unknown:
        schedule = None

    config = load_config(str(sweep_file(tmp_path, MEASURED)))
    monkeypatch.setattr(preflight_module, "point_measures", lambda *a, **k: [Unknown()])
    with pytest.raises(TypeError, match="does not time Unknown"):
        preflight(config, expand_grid(config), threads=1)
