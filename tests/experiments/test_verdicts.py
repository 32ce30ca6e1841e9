"""Hypotheses and checks judged as a family: adjusted verdicts, failed checks that make
hypotheses uninterpretable, censoring, unmeasurable statistics, combined slices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from covshift.experiments import expand_grid, load_config
from covshift.experiments.claims import judge_claims
from covshift.experiments.config import ConfigError
from covshift.experiments.numbers import PointNumbers, Reading
from covshift.experiments.significance import ALPHA, Bounds, holm
from covshift.experiments.verdicts import combine_slices, decide_unadjusted, judge_family

from .test_claims import GRID, numbers
from .test_config import write


def _grid(tmp_path: Path, claims: str):
    config = load_config(write(tmp_path, GRID + claims))
    return config, expand_grid(config)


TWO = """
[[claims]]
id = "bn-better"
text = "BN higher"
metric = "test_accuracy/final"
network = "bn"
baseline = "plain"
where = { "model.width" = 8 }
rule = "greater"
controls = ["zero-check"]
[[claims]]
id = "zero-check"
kind = "check"
guards = "controls"
text = "a control"
statistic = "value"
metric = "test_accuracy/0"
network = "plain"
where = { "model.width" = 8 }
rule = "within"
margin = 0.01
"""


def _table(points, gap: float, start: float = 0.0, noise: float = 0.01):
    rng = np.random.default_rng(0)
    return {
        p.id: numbers(
            {
                0: start,
                100: 0.6 + (gap if p.network == "bn" else 0.0) + rng.normal(0, noise),
            }
        )
        for p in points
    }


def test_hypotheses_are_adjusted_over_the_family_and_checks_are_not(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO)
    results = judge_claims(config, "e", points, _table(points, gap=0.05))
    hyp = [r for r in results if r.kind == "hypothesis"]
    checks = [r for r in results if r.kind == "check"]
    assert len(hyp) == len(checks) == 4  # one per learning rate
    assert [r.p_adjusted for r in hyp] == pytest.approx(holm([r.p_value for r in hyp]))
    assert all(r.adjust_method == "holm" and r.family_size == 4 for r in hyp)
    for r in hyp:
        assert r.verdict == ("supported" if r.p_adjusted < ALPHA else "inconclusive")
        assert r.verdict_unadjusted == ("supported" if r.p_value < ALPHA else "inconclusive")
    assert all(r.verdict == "pass" and r.p_adjusted is None for r in checks)


def test_a_failed_check_makes_the_hypotheses_it_guards_uninterpretable(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO)
    results = judge_claims(config, "e", points, _table(points, gap=0.05, start=0.5))
    hyp = [r for r in results if r.kind == "hypothesis"]
    checks = [r for r in results if r.kind == "check"]
    assert all(r.verdict == "fail" for r in checks)  # accuracy 0.5 at step 0, not 0
    for r in hyp:
        assert r.verdict == "not interpretable"
        assert r.extra["verdict_if_interpretable"] in ("supported", "inconclusive")
        assert "zero-check" in r.reason and "did not pass" in r.reason
    # judged again (the battery's family): the same outcome, not "not interpretable" twice
    judge_family(results)
    assert all(r.extra["verdict_if_interpretable"] != "not interpretable" for r in hyp)


def test_a_check_guards_only_its_own_slice(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO)
    table = _table(points, gap=0.05)
    for p in points:  # the check fails only at lr 0.4
        if p.network == "plain" and p.axes["optimizer.lr"] == 0.4:
            table[p.id] = numbers({0: 0.5, 100: 0.6})
    results = judge_claims(config, "e", points, table)
    for r in results:
        if r.kind == "hypothesis":
            lr = r.slice["optimizer.lr"]
            assert (r.verdict == "not interpretable") == (lr == 0.4)


def test_cross_preset_controls_and_unknown_controls(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO.replace('["zero-check"]', '["other:zero-check"]'))
    results = judge_claims(config, "e", points, _table(points, gap=0.05))
    own = results[:]
    judge_family(own)  # alone: the other preset's check is not there to fail
    assert all(r.verdict != "not interpretable" for r in own)
    checks = [r for r in results if r.kind == "check"]
    for c in checks:
        c.verdict_unadjusted = "contradicted"  # as if the other preset's control failed
    groups = ["mine" if r.kind == "hypothesis" else "other" for r in results]
    judge_family(results, groups)
    assert all(r.verdict == "not interpretable" for r in results if r.kind == "hypothesis")
    with pytest.raises(ConfigError, match="'nope' is not the id of a check"):
        _grid(tmp_path, TWO.replace('["zero-check"]', '["nope"]'))


def test_unmeasurable_readings_make_the_claim_not_measurable(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO)
    table = _table(points, gap=0.05)

    class Collapsed(PointNumbers):
        def reading(self, metric):  # type: ignore[override]
            return Reading(None, "not measurable: 60 of 64 units collapsed", 60, 64)

    for p in points:
        if p.network == "bn" and p.seed == 1:
            table[p.id] = Collapsed(table[p.id].run, table[p.id].series)
    results = judge_claims(config, "e", points, table)
    for r in (r for r in results if r.kind == "hypothesis"):
        assert r.verdict == "not measurable" and r.measurable is False
        assert r.measurable_reason == "seed 1: not measurable: 60 of 64 units collapsed"
        assert (r.excluded_units, r.units) == (60, 64)
        assert r.estimate is None


def test_a_statistic_without_spread_carries_no_verdict(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO.replace('rule = "greater"', 'rule = "greater"\n'))
    table = {p.id: numbers({0: 0.0, 100: 0.8 if p.network == "bn" else 0.6}) for p in points}
    results = judge_claims(config, "e", points, table)
    for r in (r for r in results if r.kind == "hypothesis"):
        assert r.interval[0] == r.interval[1]
        assert r.p_value == 0.5**4  # four seeds on one side: the sign test
        assert r.verdict == "inconclusive" and r.censored.censored is False
    # however small its p, a hypothesis with a zero-width interval gets no verdict
    r = results[0]
    r.p_value, r.p_contradict, r.reason = 1e-6, 1.0, ""
    decide_unadjusted(r)
    assert r.verdict == "inconclusive" and "without spread" in r.reason


def test_reach_times_are_bounded_by_the_evaluation_interval() -> None:
    n = numbers({0: 0.1, 50: 0.5, 100: 0.7})
    n.planned = (100, 50)
    hit = n.reading("steps_to/test_accuracy/0.6")
    assert (hit.value, hit.bounds.lo, hit.bounds.hi) == (100.0, 50.0, 100.0)
    never = n.reading("reach/test_accuracy/0.9")
    assert (never.value, never.bounds.lo, never.bounds.hi) == (150.0, 100.0, math.inf)
    assert n.reading("steps_to/test_accuracy/0.05").bounds == Bounds(0.0, 0.0, 0.0)
    assert n.value("log10/test_loss/final") == pytest.approx(math.log10(0.3))
    assert n.value("log10/test_loss/0") == pytest.approx(math.log10(0.9))


def test_combined_verdict_over_slices(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO)
    rng = np.random.default_rng(3)
    table = {}
    for p in points:  # BN helps at the two small rates, hurts at the two large ones
        lr = p.axes["optimizer.lr"]
        gap = 0.1 if lr < 1 else -0.1
        table[p.id] = numbers(
            {0: 0.0, 100: 0.6 + (gap if p.network == "bn" else 0.0) + rng.normal(0, 0.005)}
        )
    results = judge_claims(config, "e", points, table)
    (combined,) = combine_slices(results)
    assert combined["id"] == "bn-better" and combined["axes"] == ["optimizer.lr"]
    assert combined["combined"].startswith("depends on optimizer.lr: supported at ")
    assert combined["combined"].endswith(
        "supported at lr=0.1, lr=0.4, contradicted at lr=1.6, lr=6.4"
    )


def test_combined_verdict_names_the_slices_it_could_not_judge(tmp_path: Path) -> None:
    config, points = _grid(tmp_path, TWO)
    rng = np.random.default_rng(4)
    table = {}
    for p in points:  # BN helps at every rate
        bn = 0.1 if p.network == "bn" else 0.0
        table[p.id] = numbers({0: 0.0, 100: 0.6 + bn + rng.normal(0, 0.005)})
    results = judge_claims(config, "e", points, table)
    hypotheses = [r for r in results if r.id == "bn-better"]
    assert [r.verdict for r in hypotheses] == ["supported"] * 4
    (combined,) = combine_slices(results)
    assert combined["combined"] == "supported at every optimizer.lr"
    # a failed control at two rates: "every" is every rate that could be judged
    for r in hypotheses[:2]:
        r.verdict = "not interpretable"
    hypotheses[2].verdict = "inconclusive"
    (combined,) = combine_slices(results)
    assert combined["combined"] == (
        "depends on optimizer.lr: supported at lr=6.4 only, inconclusive at lr=1.6; "
        "not interpretable at lr=0.1, lr=0.4"
    )
    assert [x["verdict"] for x in combined["slices"]] == [
        "not interpretable",
        "not interpretable",
        "inconclusive",
        "supported",
    ]
    hypotheses[2].verdict = "supported"
    (combined,) = combine_slices(results)
    assert combined["combined"] == (
        "supported at every optimizer.lr judged; not interpretable at lr=0.1, lr=0.4"
    )


def test_range_statistic(tmp_path: Path) -> None:
    config, points = _grid(
        tmp_path,
        """
[[claims]]
id = "flat"
text = "flat"
statistic = "trend"
method = "range"
axis = "optimizer.lr"
metric = "test_accuracy/final"
network = "plain"
where = { "model.width" = 8 }
rule = "not_greater"
margin = 0.05
margin_reason = "5 points"
""",
    )
    rng = np.random.default_rng(5)
    table = {p.id: numbers({0: 0.0, 100: 0.6 + rng.normal(0, 0.05)}) for p in points}
    (r,) = judge_claims(config, "e", points, table)
    for seed in config.seeds:
        ys = [
            table[p.id].value("test_accuracy/final")
            for p in points
            if p.network == "plain" and p.seed == seed and p.axes["model.width"] == 8
        ]
        assert r.per_seed[str(seed)] == pytest.approx(max(ys) - min(ys))
    assert r.margin_reason == "5 points"
