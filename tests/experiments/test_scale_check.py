"""A drift hypothesis is decided only where the unit- and layer-scale drifts agree
(:mod:`covshift.experiments.scale_check`): the twin claims, the intersection-union
p-values against SciPy's t test, the verdicts, and the layer-scale fluctuation read
from a store against a NumPy computation of its formula."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from covshift.experiments import expand_grid, load_config
from covshift.experiments.claim_spec import ClaimSpec
from covshift.experiments.claims import evaluate_claims
from covshift.experiments.metric_paths import FLOOR
from covshift.experiments.numbers import PointNumbers, load_numbers
from covshift.experiments.scale_check import other_scale_metric, scale_twin, scales_disagree
from covshift.probe.figures import Figure
from covshift.report.claims_page import claims_table_html, write_claims
from covshift.store import Store

from .test_claims import run_info
from .test_config import write

GRID = """
name = "g"
title = "g"
dataset = "synthetic"
seeds = [0, 1, 2, 3, 4]
steps = 100
[networks.all]
label = "all layers train"
norm = "none"
[networks.frozen]
label = "one layer frozen"
norm = "none"
freeze = ["hidden.0"]

[[claims]]
id = "freezing-lowers-drift"
text = "freezing a layer lowers the drift"
metric = "drift/head"
network = "frozen"
baseline = "all"
rule = "less"

[[claims]]
id = "freezing-lowers-test-loss"
text = "not a drift: judged in one scale"
metric = "test_loss/final"
network = "frozen"
baseline = "all"
rule = "less"
"""


def test_the_other_scale_of_each_metric() -> None:
    assert other_scale_metric("drift/head") == "drift_layer/head"
    assert other_scale_metric("drift_layer/hidden.2.act@train") == "drift/hidden.2.act@train"
    assert other_scale_metric("fluct/mean:blocks.*") == "fluct_layer/mean:blocks.*"
    assert other_scale_metric("fluct_layer/last") == "fluct/last"
    assert other_scale_metric("floor/head") == "floor_layer/head"
    for path in ("test_accuracy/final", "drift", "log10/test_loss/final", None):
        assert other_scale_metric(path) is None


def _claim(**fields: object) -> ClaimSpec:
    base: dict[str, object] = {
        "text": "t",
        "metric": "drift/head",
        "network": "a",
        "baseline": "b",
        "rule": "less",
    }
    return ClaimSpec.model_validate({**base, **fields})


def test_which_claims_have_a_twin() -> None:
    twin = scale_twin(_claim())
    assert twin is not None and twin.metric == "drift_layer/head" and twin.rule == "less"
    twin = scale_twin(_claim(metric="fluct/last", baseline_metric="fluct/first"))
    assert twin is not None and twin.baseline_metric == "fluct_layer/first"
    # a check of the same form too: the drift above its noise floor in both scales
    twin = scale_twin(_claim(kind="check", baseline_metric="floor/head", baseline=None))
    assert twin is not None and twin.kind == "check"
    assert (twin.metric, twin.baseline_metric) == ("drift_layer/head", "floor_layer/head")
    # a value or margin is in the claim's unit; a floor is no claim's own metric; a
    # baseline that is no drift has no twin
    assert scale_twin(_claim(value=0.5, margin_reason="half a width")) is None
    assert scale_twin(_claim(margin=0.1, margin_reason="a tenth")) is None
    assert scale_twin(_claim(rule="within", margin=1e-6, margin_reason="rounding")) is None
    assert scale_twin(_claim(metric="floor/head")) is None
    assert scale_twin(_claim(baseline_metric="test_loss/final", baseline=None)) is None
    assert scale_twin(_claim(metric="test_accuracy/final")) is None


def _numbers(unit: float, layer: float) -> PointNumbers:
    numbers = PointNumbers(
        run_info(),
        {"test_loss": (np.array([0, 100]), np.array([2.0, 1.0 + unit / 100]))},
        {"head": unit},
    )
    numbers.figures[("drift", "head")] = Figure(unit, True, "64 of 64 units", 64)
    numbers.figures[("drift_layer", "head")] = Figure(layer, True, "64 of 64 units", 64)
    return numbers


Pairs = list[tuple[float, float]]  # per seed: (unit-scale drift, layer-scale drift)


def _judge(tmp_path: Path, frozen: Pairs, everything: Pairs) -> dict[str, dict]:
    seeds = ", ".join(str(s) for s in range(len(frozen)))
    config = load_config(write(tmp_path, GRID.replace("[0, 1, 2, 3, 4]", f"[{seeds}]")))
    points = expand_grid(config)
    table = {}
    for p in points:
        unit, layer = (frozen if p.network == "frozen" else everything)[p.seed]
        table[p.id] = _numbers(unit, layer)
    return {r["id"]: r for r in evaluate_claims(config, "e", points, table)}


def _t_p_values(diffs: np.ndarray) -> tuple[float, float]:
    """One-sided t p-values of the mean difference below 0 (the claim) and above."""
    below = stats.ttest_1samp(diffs, 0.0, alternative="less").pvalue
    above = stats.ttest_1samp(diffs, 0.0, alternative="greater").pvalue
    return float(below), float(above)


def test_scales_that_disagree_leave_the_hypothesis_undecided(tmp_path: Path) -> None:
    # unit scale: freezing raises the drift on every seed (a few units near collapse);
    # layer scale: it lowers it on every seed
    everything = [(2.0 + 0.1 * s, 100.0 + s) for s in range(5)]
    frozen = [(6.0 + 0.3 * s, 80.0 - 0.5 * s) for s in range(5)]
    results = _judge(tmp_path, frozen, everything)
    r = results["freezing-lowers-drift"]
    unit = np.array([f[0] - e[0] for f, e in zip(frozen, everything, strict=True)])
    layer = np.array([f[1] - e[1] for f, e in zip(frozen, everything, strict=True)])
    unit_p, layer_p = _t_p_values(unit), _t_p_values(layer)
    assert r["verdict_own_scale"] == "contradicted"
    assert r["other_scale"]["verdict"] == "supported"
    assert r["other_scale"]["metric"] == "drift_layer/head"
    assert r["other_scale"]["estimate"] == pytest.approx(layer.mean())
    assert r["p_own_scale"] == pytest.approx(list(unit_p))
    assert r["p_value"] == pytest.approx(max(unit_p[0], layer_p[0]))
    assert r["p_contradict"] == pytest.approx(max(unit_p[1], layer_p[1]))
    assert r["verdict_unadjusted"] == "inconclusive" and r["verdict"] == "inconclusive"
    assert r["estimate"] == pytest.approx(unit.mean())  # the claim's own scale
    assert "drift_layer/head" in r["reason"] and "larger of two scales" in r["reason"]
    # a metric that is not a drift is judged alone
    loss = results["freezing-lowers-test-loss"]
    assert "other_scale" not in loss and loss["verdict"] == "contradicted"
    assert scales_disagree(r) and not scales_disagree(loss)
    # the claim's page says what the other scale reads
    config = load_config(write(tmp_path, GRID))
    _, page = write_claims(list(results.values()), config, "e", tmp_path / "r", figures=False)
    text = page.read_text()
    assert "<th>other scale</th><td><code>drift_layer/head</code>" in text
    assert "supported unadjusted; contradicted in its own scale" in text
    row = claims_table_html([r])
    assert "<small>scales disagree: contradicted here, supported in drift_layer</small>" in row
    assert "scales disagree" not in claims_table_html([loss])


def test_scales_that_agree_keep_the_verdict(tmp_path: Path) -> None:
    everything = [(2.0 + 0.1 * s, 100.0 + s) for s in range(5)]
    frozen = [(1.0 + 0.05 * s, 60.0 + 2 * s) for s in range(5)]
    r = _judge(tmp_path, frozen, everything)["freezing-lowers-drift"]
    unit = np.array([f[0] - e[0] for f, e in zip(frozen, everything, strict=True)])
    layer = np.array([f[1] - e[1] for f, e in zip(frozen, everything, strict=True)])
    assert r["verdict"] == r["verdict_own_scale"] == r["other_scale"]["verdict"] == "supported"
    assert r["p_value"] == pytest.approx(max(_t_p_values(unit)[0], _t_p_values(layer)[0]))


def test_a_twin_without_values_leaves_the_claim_its_own(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GRID))
    points = expand_grid(config)
    table = {}
    for p in points:
        n = _numbers(1.0 + p.seed * 0.1 + (0.0 if p.network == "frozen" else 1.0), 1.0)
        del n.figures[("drift_layer", "head")]  # the layer scale was not computed
        table[p.id] = n
    r = {x["id"]: x for x in evaluate_claims(config, "e", points, table)}["freezing-lowers-drift"]
    # no evidence from the other scale: the claim is not decided in one scale alone
    assert r["other_scale"]["verdict"] == "not measured"
    assert r["verdict_own_scale"] == "supported" and r["p_own_scale"][0] < 0.001
    assert r["p_value"] == 1.0 and r["p_contradict"] == 1.0
    assert r["verdict"] == "inconclusive" and scales_disagree(r)


def test_a_twin_without_spread_does_not_decide(tmp_path: Path) -> None:
    # the layer scale gives the same difference on every seed: its own rule gives it no
    # verdict (no interval to judge), though its sign test's p is small; the unit scale
    # alone would be supported; together they are undecided
    everything = [(2.0 + 0.1 * s, 100.0 + s) for s in range(6)]
    frozen = [(1.0 + 0.05 * s, 90.0 + s) for s in range(6)]
    r = _judge(tmp_path, frozen, everything)["freezing-lowers-drift"]
    assert r["other_scale"]["interval"] == [-10.0, -10.0]
    assert r["other_scale"]["verdict"] == "inconclusive"
    assert r["other_scale"]["p_value"] == pytest.approx(0.5**6)  # the sign test
    assert r["p_value"] == pytest.approx(0.5**6)  # the larger of the two, below 0.025
    assert r["verdict_own_scale"] == "supported"
    assert r["verdict_unadjusted"] == "inconclusive" and r["verdict"] == "inconclusive"
    assert "the other scale alone is inconclusive" in r["reason"]


def test_layer_scale_fluctuation_from_the_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    records = 4
    base = np.sort(rng.normal(0.0, 1.0, (9, 6)), axis=0) * np.linspace(0.5, 2.0, 6)
    quantiles = [base + 0.2 * r + rng.normal(0, 0.05, base.shape) for r in range(records)]
    quantiles = [np.sort(q, axis=0) for q in quantiles]
    with Store(tmp_path / "s.db") as store:
        run_id = store.start_run("r", config={"point": {"model": {"norm": "none"}}})
        for r, q in enumerate(quantiles):
            store.log_probe(run_id, 10 * r, "hidden.0.linear", {"quantiles": q})
        second = [np.sort(q + rng.normal(0, 0.03, q.shape), axis=0) for q in quantiles]
        for r in (0, records - 1):  # the noise floor's second batch, first and last record
            store.log_probe(run_id, 10 * r, "hidden.0.linear" + FLOOR, {"quantiles": second[r]})
        store.finish_run(run_id, "finished")
        numbers = load_numbers(store, store.run(run_id))
    q = np.stack(quantiles)  # (R, Q, U)
    s0 = np.median(q[0, -1] - q[0, 0])
    steps = [np.abs(q[r] - q[r - 1]).mean(axis=0).mean() / s0 for r in range(1, records)]
    drift = np.abs(q[-1] - q[0]).mean(axis=0).mean() / s0
    assert numbers.value("fluct_layer/hidden.0.linear") == pytest.approx(np.mean(steps))
    assert numbers.value("drift_layer/hidden.0.linear") == pytest.approx(drift)
    assert numbers.value("fluct/hidden.0.linear") != pytest.approx(np.mean(steps))
    floor = np.mean([np.abs(second[r] - q[r]).mean(axis=0).mean() / s0 for r in (0, records - 1)])
    assert numbers.value("floor_layer/hidden.0.linear") == pytest.approx(floor)
    assert numbers.value("floor/hidden.0.linear") != pytest.approx(floor)


def test_the_battery_presets_twins() -> None:
    """Every drift claim of the battery's presets whose rule is a sign has its twin,
    hypothesis or check; the frozen layers' exact zero (a margin) has none."""
    twins = {}
    for name in ("shift-causes", "depth", "santurkar2018", "transformer-shift"):
        for claim in load_config(name, size="quick").claims:
            twin = scale_twin(claim)
            drift = claim.metric.split("/")[0] in ("drift", "drift_layer", "fluct")
            assert (twin is not None) == (drift and claim.rule != "within"), claim.id
            if twin is not None:
                twins[claim.id] = twin.metric
    assert "control-zero" not in twins
    assert twins["exists-head"] == "drift_layer/head"
    assert twins["noise-visible"] == "fluct_layer/last@train"
    assert twins["cause-layer2"] == "drift_layer/head"
    assert twins["drift-grows-along-layers"] == "drift_layer/*"  # a layer trend
    assert twins["depth-amplifies-layer-scale"] == "drift/last"
    assert twins["noisy-fluctuates-more"] == "fluct_layer/last@train"
    assert twins["pre-sublayer-inputs-drift-less"] == "drift_layer/mean:blocks.*.ln_?"
