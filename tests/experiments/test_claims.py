"""Claims: per-seed statistics, their intervals and verdicts, against independent
computations (SciPy, NumPy) on hand-made numbers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from covshift.experiments import expand_grid, load_config
from covshift.experiments.claim_spec import ClaimSpec, rule_text
from covshift.experiments.claims import evaluate_claims, t_interval
from covshift.experiments.numbers import PointNumbers
from covshift.experiments.significance import Bounds, rule_p_values
from covshift.store import RunInfo

from .test_config import write

GRID = """
name = "g"
title = "g"
dataset = "synthetic"
seeds = [0, 1, 2, 3]
steps = 100
[sweep]
optimizer.lr = [0.1, 0.4, 1.6, 6.4]
model.width = [8, 16]
[networks.plain]
label = "plain"
norm = "none"
[networks.bn]
label = "BN"
norm = "batch"
"""


def run_info(status: str = "finished", diverged_at: int | None = None) -> RunInfo:
    return RunInfo(
        1,
        "r",
        None,
        None,
        "p",
        {},
        0,
        status,
        "",
        None,
        100,
        diverged_at,
        "3",
        None,
        "0",
        None,
        None,
        None,
        None,
        None,
    )


def numbers(acc: dict[int, float], status: str = "finished", drift: float | None = 0.5):
    steps = np.array(sorted(acc), dtype=np.int64)
    values = np.array([acc[s] for s in steps])
    return PointNumbers(
        run_info(status, int(steps[-1]) if status == "diverged" else None),
        {
            "test_accuracy": (steps, values),
            "test_loss": (steps, 1 - values),
            "train_loss": (steps, 1 - values),
        },
        {"hidden.0.act": drift},
    )


def test_t_interval_matches_scipy() -> None:
    values = [0.3, 0.5, 0.45, 0.61, 0.2]
    mean, (lo, hi) = t_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx(expected)
    assert t_interval([0.7]) == (0.7, None)


@pytest.mark.parametrize(
    ("rule", "margin", "interval", "expected"),
    [
        ("greater", 0, (0.1, 0.3), "supported"),
        ("greater", 0, (-0.3, -0.1), "contradicted"),
        ("greater", 0, (-0.1, 0.3), "inconclusive"),
        ("less", 0, (-0.3, -0.1), "supported"),
        ("less", 0, (0.1, 0.3), "contradicted"),
        ("not_less", 0.05, (-0.04, 0.3), "supported"),
        ("not_less", 0.05, (-0.2, -0.06), "contradicted"),
        ("not_less", 0.05, (-0.2, 0.1), "inconclusive"),
        ("not_greater", 0.05, (-0.3, 0.04), "supported"),
        ("not_greater", 0.05, (0.06, 0.3), "contradicted"),
        ("within", 0.05, (-0.04, 0.04), "supported"),
        ("within", 0.05, (0.06, 0.3), "contradicted"),
        ("within", 0.05, (-0.04, 0.3), "inconclusive"),
    ],
)
def test_unadjusted_p_values_decide_as_the_interval_does(
    rule: str, margin: float, interval, expected: str
) -> None:
    """Three seeds whose 95% t interval is ``interval``: the one-sided p-values at the
    0.025 level reach the verdict the interval rule gives."""
    lo, hi = interval
    half = (hi - lo) / 2
    sd = half * math.sqrt(3) / stats.t.ppf(0.975, 2)
    values = [(lo + hi) / 2 + sd * z for z in (-1.0, 0.0, 1.0)]  # sd of these is sd
    assert t_interval(values)[1] == pytest.approx(interval)
    p_for, p_against = rule_p_values(rule, 0.0, margin, [Bounds.exact(v) for v in values])
    got = "supported" if p_for < 0.025 else "contradicted" if p_against < 0.025 else "inconclusive"
    assert got == expected
    claim = ClaimSpec(
        text="t", metric="diverged", network="a", baseline="b", rule=rule, margin=margin
    )
    assert "95% interval" in rule_text(claim)


def _grid(tmp_path: Path, claims: str):
    config = load_config(write(tmp_path, GRID + claims))
    return config, expand_grid(config)


def test_paired_difference_per_slice(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        """
[[claims]]
text = "BN higher at step 50"
metric = "test_accuracy/50"
network = "bn"
baseline = "plain"
where = { "model.width" = 16 }
rule = "greater"
""",
    )
    rng = np.random.default_rng(0)
    table = {}
    for p in points:
        base = 0.5 + 0.1 * p.seed + (0.2 if p.network == "bn" else 0.0) + rng.normal(0, 0.01)
        table[p.id] = numbers({0: 0.1, 50: base, 100: base + 0.1})
    results = evaluate_claims(config, "e", points, table)
    assert [r["slice"] for r in results] == [{"optimizer.lr": v} for v in (0.1, 0.4, 1.6, 6.4)]
    for r in results:
        lr = r["slice"]["optimizer.lr"]
        by = {
            (p.network, p.seed): table[p.id].value("test_accuracy/50")
            for p in points
            if p.axes == {"optimizer.lr": lr, "model.width": 16}
        }
        diffs = [by[("bn", s)] - by[("plain", s)] for s in config.seeds]
        mean, interval = t_interval(diffs)
        assert r["estimate"] == pytest.approx(mean) and r["interval"] == pytest.approx(interval)
        assert r["seeds"] == 4 and r["verdict"] == "supported"
        assert r["per_seed"] == pytest.approx(
            {str(s): d for s, d in zip(config.seeds, diffs, strict=True)}
        )


def test_trend_statistics_equal_scipy_and_numpy(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        """
[[claims]]
id = "rho"
text = "accuracy falls with the learning rate"
statistic = "trend"
metric = "test_accuracy/final"
network = "plain"
axis = "optimizer.lr"
where = { "model.width" = 8 }
rule = "less"
[[claims]]
id = "slope"
text = "slope per doubling"
statistic = "trend"
method = "slope"
log_axis = true
metric = "test_accuracy/final"
network = "plain"
axis = "optimizer.lr"
where = { "model.width" = 8 }
rule = "less"
""",
    )
    rng = np.random.default_rng(1)
    table = {
        p.id: numbers(
            {
                0: 0.1,
                100: 0.9 - 0.05 * math.log2(p.axes["optimizer.lr"] / 0.1) + rng.normal(0, 0.03),
            }
        )
        for p in points
    }
    rho, slope = evaluate_claims(config, "e", points, table)
    lrs = [0.1, 0.4, 1.6, 6.4]
    for seed in config.seeds:
        ys = [
            next(
                table[p.id].value("test_accuracy/final")
                for p in points
                if p.network == "plain"
                and p.seed == seed
                and p.axes == {"optimizer.lr": lr, "model.width": 8}
            )
            for lr in lrs
        ]
        assert rho["per_seed"][str(seed)] == pytest.approx(stats.spearmanr(lrs, ys).statistic)
        assert slope["per_seed"][str(seed)] == pytest.approx(np.polyfit(np.log2(lrs), ys, 1)[0])
    assert rho["verdict"] == "supported" and slope["estimate"] == pytest.approx(-0.05, abs=0.02)


def test_threshold_counts_diverged_runs_as_not_reaching(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        """
[[claims]]
text = "BN trains at larger rates"
statistic = "threshold"
metric = "test_accuracy/final"
target = 0.8
network = "bn"
baseline = "plain"
axis = "optimizer.lr"
log_axis = true
where = { "model.width" = 8 }
rule = "greater"
""",
    )
    table = {}
    for p in points:
        lr = p.axes["optimizer.lr"]
        limit = 6.4 if p.network == "bn" else (0.4 if p.seed % 2 else 1.6)
        if lr > limit:  # diverged: its carried-forward accuracy is high, but it diverged
            table[p.id] = numbers({0: 0.1, 50: 0.95}, status="diverged")
        else:
            table[p.id] = numbers({0: 0.1, 100: 0.85})
    (r,) = evaluate_claims(config, "e", points, table)
    expected = [math.log2(6.4) - math.log2(0.4 if s % 2 else 1.6) for s in config.seeds]
    assert list(r["per_seed"].values()) == pytest.approx(expected)
    assert r["data"]["0"]["curve"]["plain"][3][2] is True
    # BN trains at the grid's largest rate: its threshold is censored above (at least
    # 6.4), and the plain network's lies between its last rate that trains and the next.
    nxt = {0.4: 1.6, 1.6: 6.4}
    for s in config.seeds:
        plain = 0.4 if s % 2 else 1.6
        lo = math.log2(6.4) - math.log2(nxt[plain])
        assert r["per_seed_bounds"][str(s)] == pytest.approx([lo, math.inf])
    assert r["censored"] == {
        "censored": True,
        "side": "above",
        "seeds": 4,
        "note": "known only as a lower bound (at least the estimate)",
    }
    lows = [math.log2(6.4) - math.log2(nxt[0.4 if s % 2 else 1.6]) for s in config.seeds]
    assert r["interval"][0] == pytest.approx(t_interval(lows)[1][0])
    assert r["interval"][1] == math.inf
    assert r["p_value"] == pytest.approx(stats.ttest_1samp(lows, 0, alternative="greater").pvalue)
    # Lower bounds of 0 and 2 over four seeds: not enough for the claim.
    assert r["verdict"] == "inconclusive"


def test_missing_points_and_one_seed(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        """
[[claims]]
text = "t"
metric = "test_accuracy/final"
network = "bn"
baseline = "plain"
where = { "model.width" = 8, "optimizer.lr" = 0.1 }
rule = "greater"
""",
    )
    empty = {p.id: PointNumbers(None) for p in points}
    (r,) = evaluate_claims(config, "e", points, empty)
    assert (r["verdict"], r["seeds"], r["estimate"]) == ("not measured", 0, None)
    one = dict(empty)
    for p in points:
        if p.seed == 2:
            one[p.id] = numbers({0: 0.1, 100: 0.9 if p.network == "bn" else 0.5})
    (r,) = evaluate_claims(config, "e", points, one)
    assert (r["verdict"], r["seeds"], r["interval"]) == ("inconclusive", 1, None)
    assert r["estimate"] == pytest.approx(0.4)


def test_diverged_runs_carry_their_last_evaluation_forward() -> None:
    n = numbers({0: 0.1, 500: 0.12}, status="diverged")
    assert n.value("test_accuracy/5000") == pytest.approx(0.12)
    assert n.value("test_accuracy/final") == pytest.approx(0.12)
    assert n.value("diverged") == 1.0
    assert n.value("steps_to/test_accuracy/0.5") is None
    finished = numbers({0: 0.1, 500: 0.6, 1000: 0.7})
    assert finished.value("test_accuracy/5000") is None  # a finished run shorter than that
    assert finished.value("steps_to/test_accuracy/0.65") == 1000
    assert finished.value("steps_to/test_loss/0.45") == 500  # losses: <= the target
    assert finished.value("test_accuracy/max") == pytest.approx(0.7)


def test_difference_between_two_values_of_an_axis(tmp_path: Path) -> None:
    text = GRID.replace('[networks.plain]\nlabel = "plain"\nnorm = "none"\n', "")
    text = text.replace('[networks.bn]\nlabel = "BN"\nnorm = "batch"\n', "")
    text = text.replace("model.width = [8, 16]", 'model.norm = ["none", "batch"]')
    config = load_config(
        write(
            tmp_path,
            text
            + """
[[claims]]
text = "BN beats no norm at lr 0.4"
metric = "test_accuracy/final"
network = "default"
where = { "model.norm" = "batch", "optimizer.lr" = 0.4 }
baseline_where = { "model.norm" = "none" }
rule = "greater"
""",
        )
    )
    points = expand_grid(config)
    table = {
        p.id: numbers(
            {
                0: 0.1,
                100: 0.6
                + 0.01 * p.seed
                + (0.2 + 0.001 * p.seed if p.axes["model.norm"] == "batch" else 0.0),
            }
        )
        for p in points
    }
    (r,) = evaluate_claims(config, "e", points, table)
    assert r["per_seed"] == pytest.approx({str(s): 0.2 + 0.001 * s for s in config.seeds})
    assert r["verdict"] == "supported" and r["slice"] == {}
    with pytest.raises(Exception, match="fix the compared side of each in where too"):
        load_config(
            write(
                tmp_path,
                text
                + """
[[claims]]
text = "t"
metric = "test_accuracy/final"
network = "default"
baseline_where = { "model.norm" = "none" }
rule = "greater"
""",
                "bad.toml",
            )
        )


def test_a_seed_without_any_bound_gives_no_estimate(tmp_path: Path) -> None:
    # Steps to a target that neither network of seed 0 reaches: that seed's difference
    # is known within no bound at all. Its placeholder value must not enter the
    # estimate (a mean of the others and a made-up number) nor read as a value.
    config, points = _grid(
        tmp_path,
        """
[[claims]]
text = "BN reaches 0.8 sooner"
metric = "reach/test_accuracy/0.8"
network = "plain"
baseline = "bn"
where = { "model.width" = 8, "optimizer.lr" = 0.1 }
rule = "greater"
""",
    )

    def table(stuck_seed: int | None) -> dict[str, PointNumbers]:
        out = {}
        for p in points:
            if p.seed == stuck_seed:  # never reaches 0.8 in its 100 steps (evaluated every 50)
                stuck = numbers({0: 0.1, 50: 0.3, 100: 0.5})
                out[p.id] = dataclasses.replace(stuck, planned=(100, 50))
            else:
                reach = 50 if p.network == "bn" else 100
                out[p.id] = numbers({0: 0.1, reach: 0.9, 100: 0.9})
        return out

    (r,) = evaluate_claims(config, "e", points, table(0))
    assert r["per_seed_bounds"]["0"] == [-math.inf, math.inf]
    assert r["per_seed"]["0"] is None and r["estimate"] is None
    assert [r["per_seed"][s] for s in ("1", "2", "3")] == [50, 50, 50]
    assert r["interval"] == [-math.inf, math.inf] and r["censored"]["side"] == "both"
    assert r["verdict"] == "inconclusive"
    (r,) = evaluate_claims(config, "e", points, table(None))  # every seed measured
    assert r["estimate"] == pytest.approx(50)


@pytest.mark.parametrize("status", ["running", "interrupted", "failed"])
def test_a_run_that_has_not_ended_answers_no_metric(status: str) -> None:
    """Its curves are a prefix: no final value, no drift, and not "did not diverge"."""
    found = numbers({20: 0.4, 40: 0.6}, status=status, drift=0.5)
    assert not found.complete
    for metric in (
        "test_accuracy/final",
        "test_accuracy/20",
        "drift/hidden.0.act",
        "steps_to/test_accuracy/0.5",
        "diverged",
        "log10/test_loss/final",
    ):
        assert found.value(metric) is None, metric
    headline = found.headline((20,))
    assert headline["status"] == status and headline["final_step"] == 40
    assert headline["test_accuracy"] == {"20": None, "final": None} and headline["drift"] == {}
    done = numbers({20: 0.4, 40: 0.6}, status="finished", drift=0.5)
    assert done.complete and done.value("test_accuracy/final") == 0.6
    assert done.value("diverged") == 0.0
