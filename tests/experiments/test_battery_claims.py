"""The battery's claim statistics (value, layer trend, trend of a difference,
interaction, censored time to target, noise floor) and its across-battery claim,
each against an independent computation on hand-made numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from covshift.experiments import expand_grid, load_config
from covshift.experiments.battery import (
    attribution_matrix,
    battery_pairs,
    shift_speed_correlation,
)
from covshift.experiments.claims import evaluate_claims
from covshift.experiments.config_sections import ConfigError
from covshift.experiments.numbers import PointNumbers
from covshift.probe.figures import floor_figure

from .test_claims import run_info
from .test_config import write

GRID = """
name = "g"
title = "g"
dataset = "synthetic"
seeds = [0, 1, 2, 3]
steps = 100
eval_every = 25
[sweep]
model.depth = [2, 4, 8]
[networks.plain]
label = "plain"
norm = "none"
[networks.bn]
label = "BN"
norm = "batch"
[battery]
target = 0.6
"""


def fake(acc: dict[int, float], drift: dict[str, float], steps: int = 100) -> PointNumbers:
    s = np.array(sorted(acc), dtype=np.int64)
    v = np.array([acc[k] for k in s])
    series = {"test_accuracy": (s, v), "test_loss": (s, 1 - v), "train_loss": (s, 1 - v)}
    return PointNumbers(run_info(), series, dict(drift), planned=(steps, 25))


def _grid(tmp_path: Path, claims: str, base: str = GRID):
    config = load_config(write(tmp_path, base + claims))
    return config, expand_grid(config)


def _table(points, rng) -> dict[str, PointNumbers]:
    out = {}
    for p in points:
        depth = p.axes["model.depth"]
        gain = 0.05 * depth if p.network == "bn" else 0.0
        final = 0.5 + gain + 0.02 * p.seed + rng.normal(0, 0.005)
        layers = {
            f"hidden.{i}.act": (i + 1) * (2.0 if p.network == "plain" else 0.5) + p.seed
            for i in range(depth)
        }
        out[p.id] = fake({0: 0.1, 50: final - 0.05, 100: final}, layers)
    return out


def test_value_layer_trend_and_first_last_layers(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        """
[[claims]]
text = "last layer drift of the plain net"
statistic = "value"
metric = "drift/last"
network = "plain"
where = { "model.depth" = 8 }
rule = "greater"
[[claims]]
text = "drift grows along the layers"
statistic = "layer_trend"
metric = "drift/*"
network = "plain"
where = { "model.depth" = 4 }
rule = "greater"
""",
    )
    table = _table(points, np.random.default_rng(0))
    value, trend = evaluate_claims(config, "e", points, table)
    expected = [8 * 2.0 + s for s in config.seeds]  # drift of hidden.7.act
    assert list(value["per_seed"].values()) == pytest.approx(expected)
    assert value["estimate"] == pytest.approx(np.mean(expected))
    assert trend["per_seed"] == {str(s): pytest.approx(1.0) for s in config.seeds}
    assert trend["data"]["0"]["layers"] == [f"hidden.{i}.act" for i in range(4)]


def test_trend_of_a_difference_and_interaction(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        """
[[claims]]
text = "BN's gain grows with depth"
statistic = "trend"
method = "slope"
log_axis = true
axis = "model.depth"
metric = "test_accuracy/final"
network = "bn"
baseline = "plain"
rule = "greater"
[[claims]]
text = "gain at 8 minus gain at 2"
metric = "test_accuracy/final"
network = "bn"
baseline = "plain"
where = { "model.depth" = 8 }
baseline_where = { "model.depth" = 2 }
interaction = true
rule = "greater"
""",
    )
    table = _table(points, np.random.default_rng(1))
    by = {(p.network, p.axes["model.depth"], p.seed): table[p.id] for p in points}
    slope, inter = evaluate_claims(config, "e", points, table)
    for seed in config.seeds:
        gaps = [
            by[("bn", d, seed)].value("test_accuracy/final")
            - by[("plain", d, seed)].value("test_accuracy/final")
            for d in (2, 4, 8)
        ]
        assert slope["per_seed"][str(seed)] == pytest.approx(
            np.polyfit(np.log2([2, 4, 8]), gaps, 1)[0]
        )
        assert inter["per_seed"][str(seed)] == pytest.approx(gaps[2] - gaps[0])
    assert inter["estimate"] == pytest.approx(0.3, abs=0.02)  # 0.05 x (8 - 2)


def test_reach_is_censored_and_steps_to_is_not() -> None:
    never = fake({0: 0.1, 50: 0.3, 100: 0.4}, {})
    assert never.value("steps_to/test_accuracy/0.6") is None
    assert never.value("reach/test_accuracy/0.6") == 125.0  # 100 steps + one interval
    hit = fake({0: 0.1, 50: 0.7, 100: 0.8}, {})
    assert hit.value("reach/test_accuracy/0.6") == hit.value("steps_to/test_accuracy/0.6") == 50


def test_noise_floor_against_numpy() -> None:
    rng = np.random.default_rng(2)
    steps = np.array([0, 10, 20])
    q = np.sort(rng.normal(size=(3, 3, 5)), axis=1)  # (R, Q, U)
    second = np.sort(rng.normal(size=(2, 3, 5)), axis=1)
    width = (q[:, -1] - q[:, 0]).mean(axis=0)
    expected = np.mean(
        [
            (np.abs(second[0] - q[0]).mean(0) / width).mean(),
            (np.abs(second[1] - q[2]).mean(0) / width).mean(),
        ]
    )
    assert floor_figure(q, steps, second, np.array([0, 20])).value == pytest.approx(expected)
    assert floor_figure(q, steps, second[:1], np.array([5])).value is None  # no common step


def test_pairs_and_correlation_against_scipy(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path, "", base=GRID.replace("model.depth = [2, 4, 8]", "model.depth = [2, 3, 4, 5, 6]")
    )
    rng = np.random.default_rng(3)
    table = {}
    for p in points:
        drift = rng.uniform(0.5, 2.0)
        reach = int(rng.choice([25, 50, 75, 100]))
        acc = {s: (0.7 if s >= reach else 0.3) for s in (0, 25, 50, 75, 100)}
        table[p.id] = fake(acc, {"hidden.0.act": drift, "hidden.1.act": 2 * drift})
    pairs = battery_pairs(config, points, table)
    assert len(pairs) == 5 * 4  # one pair per depth and seed
    by = {(p.network, p.axes["model.depth"], p.seed): table[p.id] for p in points}
    first = pairs[0]
    bn, plain = by[("bn", 2, 0)], by[("plain", 2, 0)]
    assert first["drift_reduction"] == pytest.approx(
        np.mean([plain.drift[k] for k in plain.drift]) - np.mean([bn.drift[k] for k in bn.drift])
    )
    t_bn = bn.value("steps_to/test_accuracy/0.6")
    t_plain = plain.value("steps_to/test_accuracy/0.6")
    assert first["speedup"] == pytest.approx(np.log2(t_plain / t_bn))
    assert first["drift_reduction_layer"] is None  # no layer-scale figures recorded
    assert all(p["censored"] == [False, False] for p in pairs)  # every run reaches 0.6


def test_battery_where_pairs_one_end_of_an_axis_only(tmp_path: Path) -> None:
    # two training budgets of the same runs: only the larger's pairs enter the stratum
    base = GRID.replace("model.depth = [2, 4, 8]", "model.depth = [2, 4, 8]\nsteps = [50, 100]")
    config, points = _grid(
        tmp_path, "", base=base.replace("[battery]\n", '[battery]\nwhere = { steps = "largest" }\n')
    )
    assert config.battery.where == {"steps": 100}
    table = {p.id: fake({0: 0.3, 25: 0.7}, {"hidden.0.act": 1.0 + p.seed}) for p in points}
    pairs = battery_pairs(config, points, table)
    assert len(pairs) == 3 * 4  # one pair per depth and seed, at 100 steps
    by_name = {p.name: p for p in points}
    assert {by_name[p["point"]].axes["steps"] for p in pairs} == {100}
    _, every = _grid(tmp_path, "", base=base)
    assert (
        len(
            battery_pairs(
                config.model_copy(
                    update={"battery": config.battery.model_copy(update={"where": {}})}
                ),
                every,
                table,
            )
        )
        == 3 * 4 * 2
    )
    with pytest.raises(ConfigError, match=r"battery\.where: 'model\.width' is not a sweep axis"):
        _grid(
            tmp_path,
            "",
            base=base.replace("[battery]\n", '[battery]\nwhere = { "model.width" = 8 }\n'),
        )


def _pair(experiment: str, seed: int, drift: float, speed: float, censored=(False, False)):
    return {
        "experiment": experiment,
        "seed": seed,
        "drift_reduction": drift,
        "speedup": speed,
        "censored": list(censored),
    }


def test_correlation_is_stratified_by_preset() -> None:
    """Simpson's paradox: within each preset more drift reduction goes with LESS speed-up,
    while the presets' offsets make the pooled correlation positive. The stratified
    claim follows the strata (Fisher's z, weighted by n - 3), not the pooled sign."""
    rng = np.random.default_rng(4)
    pairs = []
    for k, name in enumerate(("a", "b", "c")):
        for seed in range(5):
            for i in range(6):
                x = 10.0 * k + i + rng.normal(0, 0.2)
                pairs.append(_pair(name, seed, x, 10.0 * k - 0.5 * i + rng.normal(0, 0.6)))
    pairs.append(_pair("a", 0, 99.0, 99.0, censored=(False, True)))  # not in the primary
    pooled = stats.spearmanr(
        [p["drift_reduction"] for p in pairs[:-1]], [p["speedup"] for p in pairs[:-1]]
    ).statistic
    assert pooled > 0.5
    combined, *strata = shift_speed_correlation(pairs, range(5))
    expected_z, weights = [], []
    for name, result in zip(("a", "b", "c"), strata, strict=True):
        mine = [p for p in pairs[:-1] if p["experiment"] == name]
        rho = stats.spearmanr(
            [p["drift_reduction"] for p in mine], [p["speedup"] for p in mine]
        ).statistic
        assert result.slice == {"preset": name}
        assert result.estimate == pytest.approx(rho)
        expected_z.append(np.arctanh(rho))
        weights.append(len(mine) - 3)
    assert combined.estimate == pytest.approx(np.tanh(np.average(expected_z, weights=weights)))
    assert combined.estimate < -0.5
    assert combined.interval[1] < 0 and combined.verdict_unadjusted == "contradicted"
    assert combined.p_contradict < 0.001 and combined.p_value > 0.9
    assert combined.extra["pairs_total"] == len(pairs)
    assert combined.extra["secondary"]["pairs"] == len(pairs)
    # each seed's own combined correlation is reported beside the pooled-over-seeds one
    for seed in range(5):
        mine = [p for p in pairs[:-1] if p["seed"] == seed]
        rhos = [
            stats.spearmanr(
                [p["drift_reduction"] for p in mine if p["experiment"] == n],
                [p["speedup"] for p in mine if p["experiment"] == n],
            ).statistic
            for n in ("a", "b", "c")
        ]
        z = np.arctanh(np.clip(rhos, -0.999999, 0.999999))  # +-1 is taken as +-0.999999
        assert combined.per_seed[str(seed)] == pytest.approx(np.tanh(np.mean(z)))


def test_correlation_is_decided_only_where_both_drift_scales_agree() -> None:
    """Each pair carries its drift reduction in both scales; the claim's p-values are
    the larger of the two scales' (scale_check): a layer-scale reduction that runs the
    other way leaves the claim undecided, one that agrees keeps its verdict."""
    rng = np.random.default_rng(5)
    agree, disagree = [], []
    for k, name in enumerate(("a", "b")):
        for seed in range(5):
            for i in range(6):
                x = i + rng.normal(0, 0.2)
                pair = _pair(name, seed, x, 2.0 * i + rng.normal(0, 0.5) + k)
                agree.append({**pair, "drift_reduction_layer": 3.0 * x + 1.0})
                disagree.append({**pair, "drift_reduction_layer": -x})
    own, *_ = shift_speed_correlation(
        [{k: v for k, v in p.items() if k != "drift_reduction_layer"} for p in agree], range(5)
    )
    # pairs without the field (made before it existed): the unit scale alone
    assert own.verdict_unadjusted == "supported" and "other_scale" not in own.extra
    combined, *strata = shift_speed_correlation(agree, range(5))
    assert combined.verdict_unadjusted == "supported"
    other = combined.extra["other_scale"]
    assert other["metric"] == "drift_layer/mean" and other["verdict"] == "supported"
    assert other["estimate"] == pytest.approx(combined.estimate)  # ranks unchanged
    assert combined.p_value == pytest.approx(max(own.p_value, other["p_value"]))
    combined, *strata = shift_speed_correlation(disagree, range(5))
    assert combined.extra["verdict_own_scale"] == "supported"
    assert combined.extra["other_scale"]["verdict"] == "contradicted"
    assert combined.extra["other_scale"]["estimate"] == pytest.approx(-combined.estimate)
    assert combined.verdict_unadjusted == "inconclusive"
    assert all(r.verdict_unadjusted == "inconclusive" for r in strata)
    # a pair whose layer-scale reduction was not measurable leaves both analyses
    dropped = [{**p, "drift_reduction_layer": None} if p["experiment"] == "b" else p for p in agree]
    combined, *strata = shift_speed_correlation(dropped, range(5))
    assert [r.slice["preset"] for r in strata] == ["a"]
    assert combined.extra["pairs"] == [p for p in agree if p["experiment"] == "a"]
    assert combined.extra["other_scale"]["verdict"] == "supported"


def test_correlation_without_trained_pairs_is_not_measured() -> None:
    pairs = [
        _pair("a", s, float(i), float(i), censored=(True, False))
        for s in range(3)
        for i in range(5)
    ]
    (combined,) = shift_speed_correlation(pairs, range(3))
    assert combined.verdict == "not measured"
    assert "0 such pairs of 15" in combined.reason
    # every pair reaches the target at the same evaluation: no spread, no correlation,
    # and the reason says so (not that too few pairs train)
    tied = [_pair("a", s, float(i), 0.0) for s in range(3) for i in range(5)]
    combined, stratum = shift_speed_correlation(tied, range(3))
    assert combined.verdict == stratum.verdict == "not measured"
    assert "a: 15 pairs, every speed-up +0 (both networks of every pair reach" in combined.reason


def test_attribution_matrix(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        "",
        base="""
name = "m"
title = "m"
dataset = "synthetic"
seeds = [0, 1]
steps = 100
[model]
depth = 3
[networks.all]
label = "all"
[networks.f0]
label = "f0"
freeze = ["hidden.0"]
""",
    )
    table = {}
    for p in points:
        scale = 0.25 if p.network == "f0" else 1.0
        table[p.id] = fake({0: 0.1, 100: 0.5}, {"a": 2.0 * (p.seed + 1), "b": scale * 4.0})
    matrix = attribution_matrix(config, points, table)
    assert matrix is not None and matrix["networks"] == ["f0"]
    assert matrix["layers"] == ["a", "b"]
    assert matrix["share_removed"] == [[pytest.approx(0.0), pytest.approx(0.75)]]
