"""Layer figures over usable units: every number against a plain-loop computation,
every exclusion counted and named, no numpy warning, no finite number from
non-finite input; and a deep sigmoid MLP whose deep layers collapse is reported not
measurable, while a healthy network's drift is exactly the first probe's figure."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from covshift.data.generated import synthetic
from covshift.models import build_mlp
from covshift.probe import ShiftProbe
from covshift.probe.figures import (
    drift_figure,
    floor_figure,
    fluctuation_figure,
    relative_gradient_ics,
)
from covshift.probe.shift_metrics import unit_quantile_drift
from covshift.probe.usable import UsableRule, usable_units


@pytest.fixture(autouse=True)
def no_numpy_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            yield


def healthy(records: int = 4, units: int = 10, seed: int = 0) -> np.ndarray:
    """(R, 3, U) quantiles of units centred near 0 with widths near 2, moving a little."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(records, 1, units)).cumsum(axis=0) * 0.3
    spread = 1.0 + 0.2 * rng.random(size=(records, 1, units))
    return centre + spread * np.array([-1.0, 0.05, 1.0])[None, :, None]


def loop_drift(q: np.ndarray, units: list[int], a: int = 0, b: int = -1) -> float:
    """Plain loops: mean over ``units`` of (1/|Q|) sum_q |Q(b) - Q(a)| / w_u."""
    total = 0.0
    for u in units:
        width = sum(q[r, -1, u] - q[r, 0, u] for r in range(q.shape[0])) / q.shape[0]
        moved = sum(abs(q[b, k, u] - q[a, k, u]) for k in range(q.shape[1])) / q.shape[1]
        total += moved / width
    return total / len(units)


# -- which units are usable -------------------------------------------------------------


def test_usable_units_against_a_plain_loop() -> None:
    q = healthy(records=3, units=8)
    q[1, :, 2] = 7.0 + np.array([0.0, 1e-4, 2e-4])  # collapsed at record 1 (width 2e-4)
    q[:, :, 5] *= 1e-4  # tiny but among units of magnitude ~1: collapsed everywhere
    q[2, 1, 6] = np.nan
    sat = np.zeros((3, 8))
    sat[0, 3] = 0.995
    sat[2, 4] = 0.99  # exactly at the limit: inactive
    sat[1, 7] = 0.98
    states = usable_units(q, sat)
    for r in range(3):
        finite = [bool(np.all(np.isfinite(q[r, :, u]))) for u in range(8)]
        magnitude = [max(abs(v) for v in q[r, :, u]) for u in range(8) if finite[u]]
        scale = (
            sorted(magnitude)[len(magnitude) // 2]
            if len(magnitude) % 2
            else (
                sorted(magnitude)[len(magnitude) // 2 - 1] + sorted(magnitude)[len(magnitude) // 2]
            )
            / 2
        )
        for u in range(8):
            collapsed = finite[u] and q[r, -1, u] - q[r, 0, u] <= 1e-3 * scale
            assert states.non_finite[r, u] == (not finite[u])
            assert states.collapsed[r, u] == collapsed, (r, u)
            assert states.inactive[r, u] == (finite[u] and sat[r, u] >= 0.99)
    assert states.collapsed[1, 2] and not states.collapsed[0, 2]
    assert states.collapsed[:, 5].all()
    assert states.inactive[0, 3] and states.inactive[2, 4] and not states.inactive[1, 7]


def test_a_layer_of_constants_collapses_and_a_small_scale_layer_does_not() -> None:
    # Vanishing signal: every unit a constant of size ~0.4 with a spread of 1e-6; the
    # widths all collapse together, their magnitude does not.
    q = 0.4 + np.zeros((2, 3, 6)) + np.array([0.0, 5e-7, 1e-6])[None, :, None]
    assert usable_units(q).collapsed.all()
    # A whole layer scaled by 1e-6 keeps its relative structure: nothing collapsed.
    small = healthy() * 1e-6
    assert not usable_units(small).collapsed.any()
    figure = drift_figure(small)
    assert figure.measurable and figure.value == pytest.approx(loop_drift(small, list(range(10))))


def test_rule_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="collapse_floor must be a fraction"):
        UsableRule(collapse_floor=0.0)
    with pytest.raises(ValueError, match="saturation has shape"):
        usable_units(healthy(), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="levels >= 2"):
        drift_figure(np.zeros((3, 1, 4)))
    with pytest.raises(ValueError, match="activation must be"):
        drift_figure(healthy(), activation="gelu")
    with pytest.raises(ValueError, match="scale must be"):
        drift_figure(healthy(), scale="pooled")


# -- drift ------------------------------------------------------------------------------


def test_drift_with_every_unit_usable_is_exactly_the_first_probes_figure() -> None:
    q = healthy()
    figure = drift_figure(q, np.full((4, 10), 0.2), activation="sigmoid")
    assert figure.value == float(unit_quantile_drift(q).mean())
    assert figure.value == pytest.approx(loop_drift(q, list(range(10))), rel=1e-12)
    assert figure.measurable and figure.excluded == 0 and figure.total == 10
    assert figure.reason == "10 of 10 units"


def test_drift_over_usable_units_counts_each_exclusion_once() -> None:
    q = healthy(units=10)
    q[-1, :, 1] = 3.0  # collapsed at the last record
    q[0, :, 2] = -2.0  # collapsed at the first record
    sat = np.zeros((4, 10))
    sat[0, 4] = 1.0  # inactive at the first record
    sat[-1, 2] = 1.0  # collapsed AND inactive: counted once, as inactive
    sat[1, 6] = 1.0  # inactive at a record in between: the drift does not compare it
    figure = drift_figure(q, sat, activation="relu")
    usable = [0, 3, 5, 6, 7, 8, 9]
    assert figure.value == pytest.approx(loop_drift(q, usable), rel=1e-12)
    assert (figure.dead, figure.collapsed, figure.saturated, figure.excluded) == (2, 1, 0, 3)
    assert figure.reason == "7 of 10 units (2 dead, 1 collapsed excluded)"
    assert drift_figure(q, sat).saturated == 2  # activation unknown: counted as saturated


def test_a_layer_with_most_units_excluded_is_not_measurable_with_the_reason() -> None:
    q = healthy(units=10)
    q[-1, :, :6] = 0.5  # six units collapse to a constant
    figure = drift_figure(q)
    assert figure.value is None and not figure.measurable
    assert figure.reason == "not measurable: 6 of 10 units collapsed"
    assert figure.as_dict()["excluded"] == 6
    sat = np.zeros((4, 10))
    sat[0, 6] = 1.0
    mixed = drift_figure(q, sat, activation="tanh")
    assert mixed.reason == "not measurable: 7 of 10 units excluded (1 saturated, 6 collapsed)"
    # Exactly half usable is enough (the threshold is inclusive).
    q[-1, :, 5] = healthy(units=10)[-1, :, 5]
    assert drift_figure(q).measurable and drift_figure(q).used == 5


def test_non_finite_values_are_never_a_number() -> None:
    q = healthy()
    q[2, 0, 3] = np.inf  # a record in between: the unit's width averages over it
    figure = drift_figure(q)
    assert figure.value is None and figure.non_finite == 1
    assert figure.reason == "not measurable: non-finite values in 1 of 10 units"
    sat = np.zeros((4, 10))
    sat[0, 0] = np.nan
    assert drift_figure(healthy(), sat).reason.startswith("not measurable: non-finite")
    assert drift_figure(np.full((3, 3, 4), np.nan)).value is None
    overflow = healthy() * 1e307  # finite values whose displacement overflows
    overflow[-1] += 1.5e308
    assert drift_figure(overflow).reason == "not measurable: the figure is not finite"


def test_one_record_is_not_measurable() -> None:
    figure = drift_figure(healthy(records=1))
    assert (
        figure.value is None and figure.reason == "not measurable: 1 record (a drift compares two)"
    )


def test_layer_scale_drift_against_a_hand_computation_and_a_shrinking_unit() -> None:
    q = healthy(units=9)
    # Unit 0's width shrinks to 0.3 % of the layer's size (above the collapse floor)
    # while it moves as much as the others: its own-width drift is large.
    q[:, :, 0] = q[:, 1:2, 0] + np.array([-1.0, 0.0, 1.0])[None, :] * 3e-3
    widths0 = [q[0, -1, u] - q[0, 0, u] for u in range(9)]
    moved = [np.mean(np.abs(q[-1, :, u] - q[0, :, u])) for u in range(9)]
    expected = np.mean(moved) / np.median(widths0)
    figure = drift_figure(q, scale="layer")
    assert figure.value == pytest.approx(expected, rel=1e-12)
    unit = drift_figure(q)
    assert unit.value > 20 * figure.value  # the shrinking unit dominates the unit scale


# -- fluctuation ------------------------------------------------------------------------


def test_fluctuation_against_a_loop_and_motion_that_comes_back() -> None:
    q = healthy(records=5)
    pairs = [loop_drift(q, list(range(10)), r - 1, r) for r in range(1, 5)]
    assert fluctuation_figure(q).value == pytest.approx(np.mean(pairs), rel=1e-12)
    two = q[[0, -1]]
    assert fluctuation_figure(two).value == pytest.approx(drift_figure(two).value, rel=1e-12)
    back = np.stack([q[0], q[1], q[0]])  # there and back: no displacement, real motion
    assert drift_figure(back).value == 0.0
    assert fluctuation_figure(back).value == pytest.approx(
        loop_drift(back, list(range(10)), 0, 1), rel=1e-12
    )
    # Usable at every record: a unit saturated in between is left out.
    sat = np.zeros((5, 10))
    sat[2, 3] = 1.0
    figure = fluctuation_figure(q, sat)
    usable = [u for u in range(10) if u != 3]
    width = (q[:, -1, usable] - q[:, 0, usable]).mean(axis=0)
    steps = np.abs(np.diff(q[:, :, usable], axis=0)).mean(axis=1) / width
    assert figure.value == pytest.approx(steps.mean(), rel=1e-12) and figure.saturated == 1


# -- noise floor ------------------------------------------------------------------------


def test_floor_uses_the_drifts_units_and_widths() -> None:
    q = healthy(records=4, units=10)
    steps = np.array([0, 10, 20, 30])
    rng = np.random.default_rng(1)
    second = q[[0, 3]] + rng.normal(scale=0.05, size=(2, 3, 10))
    floor_steps = np.array([0, 30])
    width = [(q[:, -1, u] - q[:, 0, u]).mean() for u in range(10)]
    expected = np.mean(
        [
            np.mean([np.mean(np.abs(second[f, :, u] - q[r, :, u])) / width[u] for u in range(10)])
            for f, r in ((0, 0), (1, 3))
        ]
    )
    figure = floor_figure(q, steps, second, floor_steps)
    assert figure.value == pytest.approx(expected, rel=1e-12) and figure.used == 10
    # An unmatched floor step is ignored; a unit collapsed in the second batch is left out
    # of the floor, with the same widths for the others.
    extra = np.concatenate([second, second[:1]])
    extra[1, :, 4] = 2.0
    figure = floor_figure(q, steps, extra, np.array([0, 30, 15]))
    usable = [u for u in range(10) if u != 4]
    expected = np.mean(
        [
            np.mean([np.mean(np.abs(extra[f, :, u] - q[r, :, u])) / width[u] for u in usable])
            for f, r in ((0, 0), (1, 3))
        ]
    )
    assert figure.value == pytest.approx(expected, rel=1e-12) and figure.collapsed == 1
    none = floor_figure(q, steps, second, np.array([5, 15]))
    assert none.reason == "not measurable: no floor record at a step of the probe's records"
    layer = floor_figure(q, steps, second, floor_steps, scale="layer")
    scale = np.median(q[0, -1] - q[0, 0])
    expected = np.mean([np.abs(second[f] - q[r]).mean() / scale for f, r in ((0, 0), (1, 3))])
    assert layer.value == pytest.approx(expected, rel=1e-12)


# -- relative gradient ICS --------------------------------------------------------------


def test_relative_gradient_ics() -> None:
    l2 = np.array([0.5, 2.0, 0.0, 3.0])
    norm = np.array([1.0, 4.0, 0.0, 1.5])
    figure = relative_gradient_ics(l2, norm)
    assert figure.value == pytest.approx((0.5 + 0.5 + 2.0) / 3)
    assert figure.zero_gradient == 1 and figure.what == "measurements"
    assert figure.reason == "3 of 4 measurements (1 at zero gradient excluded)"
    zero = relative_gradient_ics(np.zeros(3), np.array([0.0, 0.0, 1.0]))
    assert zero.value is None
    assert zero.reason == "not measurable: 2 of 3 measurements at zero gradient"
    assert relative_gradient_ics(np.array([1.0, np.nan]), np.ones(2)).value is None
    with pytest.raises(ValueError, match="must pair"):
        relative_gradient_ics(np.ones(3), np.ones(2))


# -- networks ---------------------------------------------------------------------------


def probed_training(depth: int, steps: int, lr: float) -> dict[str, list[dict[str, np.ndarray]]]:
    """A width-32 sigmoid MLP (Xavier init, no norm) trained by SGD on synthetic data,
    its activations' inputs recorded every 100 steps."""
    data = synthetic(n_train=1000, n_test=300, num_features=64, num_classes=4, seed=0)
    net = build_mlp(64, 4, width=32, depth=depth, init="xavier", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    with ShiftProbe(net, "hidden.*.act", data.x_test, every=100, background=False) as probe:
        probe.maybe_record(0)
        for step in range(1, steps + 1):
            idx = torch.randint(0, 1000, (60,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            probe.maybe_record(step)
    layers: dict[str, list[dict[str, np.ndarray]]] = {}
    for r in probe.records:
        layers.setdefault(r.layer, []).append(r.stats)
    return layers


def stacked(records: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([s[key] for s in records])


def test_deep_sigmoid_layers_that_collapse_are_not_measurable() -> None:
    layers = probed_training(depth=16, steps=200, lr=0.5)
    first, last = layers["hidden.0.act"], layers["hidden.15.act"]
    q_last = stacked(last, "quantiles")
    assert unit_quantile_drift(q_last).mean() > 1e3  # the artifact this guards against
    figure = drift_figure(q_last, stacked(last, "saturation"), activation="sigmoid")
    assert figure.value is None and figure.collapsed >= 16
    assert figure.reason == f"not measurable: {figure.excluded} of 32 units collapsed"
    assert drift_figure(q_last, scale="layer").value is None
    assert fluctuation_figure(q_last).value is None
    q_first = stacked(first, "quantiles")
    ok = drift_figure(q_first, stacked(first, "saturation"), activation="sigmoid")
    assert ok.measurable and ok.excluded == 0
    assert ok.value == float(unit_quantile_drift(q_first).mean())


def test_a_healthy_networks_drift_is_exactly_todays_figure() -> None:
    layers = probed_training(depth=2, steps=200, lr=0.5)
    for records in layers.values():
        q = stacked(records, "quantiles")
        figure = drift_figure(q, stacked(records, "saturation"), activation="sigmoid")
        assert figure.excluded == 0 and figure.value == float(unit_quantile_drift(q).mean())
        assert figure.value > 0.01  # it trains: the drift is not a trivial zero
