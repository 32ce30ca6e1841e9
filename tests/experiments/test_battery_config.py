"""The battery's configuration: sizes, training length in examples, linear learning
rate scaling, test subsets, the shipped battery presets, and the measurement records a
point writes (train mode, noise floor, gradient ICS, smoothness)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covshift.data import load_dataset
from covshift.experiments import expand_grid, load_config
from covshift.experiments.battery import BATTERY
from covshift.experiments.config import ConfigError
from covshift.experiments.point import train_point
from covshift.models import build_mlp
from covshift.probe import GradientICSMonitor, ShiftProbe, SmoothnessMonitor
from covshift.training import TrainConfig, train

from .test_config import write

BASE = """
name = "b"
title = "b"
dataset = "synthetic"
seeds = 2
examples = 600
eval_examples = 120
batch_size = 30
[optimizer]
lr = 0.2
lr_reference_batch = 30
[sweep]
batch_size = [10, 30, 60]
[sizes.quick]
minutes = 0.5
set = { examples = 300, seeds = 1, sweep.batch_size = [15, 30] }
"""


def test_examples_and_linear_lr_scaling_resolve_per_point(tmp_path: Path) -> None:
    points = expand_grid(load_config(write(tmp_path, BASE)))
    got = {(p.axes["batch_size"], p.seed): p.spec for p in points}
    for b in (10, 30, 60):
        spec = got[(b, 0)]
        assert spec.steps == 600 // b and spec.eval_every == 120 // b
        assert spec.optimizer.lr == pytest.approx(0.2 * b / 30)
        assert spec.optimizer.lr_reference_batch is None  # the point records the used rate


def test_a_size_overrides_the_preset(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), size="quick")
    assert config.size == "quick" and config.seeds == (0,)
    assert config.sweep["batch_size"] == (15, 30)
    assert [p.spec.steps for p in expand_grid(config)] == [20, 10]
    with pytest.raises(ConfigError, match="has no size 'huge'; its sizes: quick"):
        load_config(write(tmp_path, BASE), size="huge")


def test_steps_and_examples_conflict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give steps or examples"):
        load_config(write(tmp_path, BASE.replace("examples = 600", "examples = 600\nsteps = 7")))


@pytest.mark.parametrize("name", BATTERY)
def test_every_battery_preset_has_both_sizes_and_expands(name: str) -> None:
    for size in ("quick", "full"):
        config = load_config(name, size=size)
        assert config.sizes[size].minutes is not None
        points = expand_grid(config)
        assert len({p.seed for p in points}) >= 3  # >= 3 seeds per point at every size
        assert config.claims


def test_a_points_records_match_the_callbacks_run_by_hand(tmp_path: Path) -> None:
    """train_point with probe mode both, noise floor, gradient ICS and smoothness
    records exactly what the same callbacks record around a plain train() call."""
    config = load_config(
        write(
            tmp_path,
            """
name = "m"
title = "m"
dataset = "synthetic"
seeds = 1
steps = 40
batch_size = 20
eval_every = 20
[model]
width = 12
depth = 2
norm = "batch_noisy"
[probe]
every = 20
examples = 50
mode = "both"
noise_floor = true
gradient_ics_every = 20
smoothness_every = 20
measure_batch = 16
""",
        )
    )
    (point,) = expand_grid(config)
    data = load_dataset("synthetic")

    class Sink:
        def __init__(self) -> None:
            self.records: list = []

        def scalars(self, step, values) -> None:
            pass

        def probe(self, record) -> None:
            self.records.append(record)

        def end(self, *args, **kwargs) -> None:
            pass

    sink = Sink()
    assert train_point(point.spec, data, sink).status == "finished"
    got = {(r.step, r.layer): r.stats for r in sink.records}

    torch.manual_seed(0)
    model = build_mlp(data.num_features, 10, width=12, depth=2, norm="batch_noisy", seed=0)
    batch, second = data.x_test[:50], data.x_test[50:100]
    records: dict = {}

    def keep(suffix: str):
        return lambda r: records.__setitem__((r.step, r.layer + suffix), r.stats)

    callbacks = [
        ShiftProbe(model, "hidden.*.act", batch, every=20, sink=keep(""), background=False),
        ShiftProbe(model, "hidden.*.act", batch, every=20, mode="train", sink=keep("@train")),
        ShiftProbe(model, "hidden.*.act", second, steps=[0, 40], sink=keep("@floor")),
        GradientICSMonitor(every=20, batch_size=16, seed=0, sink=keep("")),
        SmoothnessMonitor(every=20, batch_size=16, seed=0, sink=keep("")),
    ]
    train(
        model,
        data,
        TrainConfig(steps=40, batch_size=20, lr=0.5, eval_every=20, seed=0),
        callbacks=callbacks,
    )
    assert set(got) == set(records)
    assert any(k[1].endswith("@train") for k in got) and any(k[1] == "(model)" for k in got)
    for key, stats in records.items():
        for name, value in stats.items():
            np.testing.assert_array_equal(got[key][name], value, err_msg=f"{key} {name}")
    # train mode differs from eval mode for noisy BN (its noise is on, its statistics
    # are the batch's), and a train-mode record changes no buffer
    assert not np.array_equal(
        got[(40, "hidden.1.act")]["mean"], got[(40, "hidden.1.act@train")]["mean"]
    )


def test_train_mode_records_leave_buffers_and_randomness_alone() -> None:
    model = build_mlp(16, 3, width=8, depth=2, norm="batch_noisy", seed=1)
    x = torch.rand(40, 16)
    model.train()
    model(torch.rand(30, 16))  # running statistics away from their initial values
    buffers = [b.clone() for b in model.buffers()]
    state = torch.get_rng_state()
    probe = ShiftProbe(model, "hidden.*.act", x, every=1, mode="train")
    probe.record_now(0)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert torch.equal(state, torch.get_rng_state())
    # the record is what a train-mode forward of the batch feeds the layer, noise included
    seen = {}
    handle = model.hidden[1].act.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad(), torch.random.fork_rng():
        model(x)
    handle.remove()
    for b, saved in zip(model.buffers(), buffers, strict=True):
        b.copy_(saved)
    np.testing.assert_allclose(
        probe.records[1].stats["mean"], seen["x"].double().mean(0).numpy(), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="mode='train' records on the training thread"):
        ShiftProbe(model, "hidden.*.act", x, mode="train", background=True)
