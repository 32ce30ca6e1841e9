"""The metric paths of the transformer presets: gradient norms by layer and step,
BatchNorm's batch-statistics fluctuation, the mean of a figure over probed layers (a
glob), and layer trends along a glob of layers, on hand-made numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covshift.experiments import expand_grid, load_config
from covshift.experiments.claims import evaluate_claims
from covshift.experiments.metric_paths import parse_metric
from covshift.experiments.numbers import PointNumbers
from covshift.probe.figures import Figure

from .test_claims import run_info
from .test_config import write


def test_parse_the_new_paths_and_their_errors() -> None:
    m = parse_metric("grad_norm/0/blocks.3.mlp.c_fc")
    assert (m.kind, m.when, m.layer) == ("grad_norm", 0, "blocks.3.mlp.c_fc")
    m = parse_metric("log10/grad_norm/20/head")
    assert m.inner is not None and (m.inner.kind, m.inner.when) == ("grad_norm", 20)
    m = parse_metric("batch_stats/design_effect/mean")
    assert (m.kind, m.stat, m.layer) == ("batch_stats", "design_effect", "mean")
    assert parse_metric("drift/mean:blocks.*.ln_?").layer == "mean:blocks.*.ln_?"
    with pytest.raises(ValueError, match="grad_norm needs a step and a layer"):
        parse_metric("grad_norm/first/head")
    with pytest.raises(ValueError, match="grad_norm needs a step and a layer"):
        parse_metric("grad_norm/0")
    with pytest.raises(ValueError, match=r"batch_stats needs a figure \(design_effect"):
        parse_metric("batch_stats/spread/mean")


def _numbers(drift: dict[str, float], grads: dict[tuple[str, int], float]) -> PointNumbers:
    numbers = PointNumbers(run_info(), {}, dict(drift))
    numbers.grad_norms = dict(grads)
    numbers.measures = {
        ("blocks.0.ln_1.norm", "bn_design_effect"): 3.0,
        ("blocks.1.ln_1.norm", "bn_design_effect"): 5.0,
    }
    return numbers


def test_readings_of_gradient_norms_batch_stats_and_means() -> None:
    drift = {"blocks.0.ln_1": 1.0, "blocks.0": 4.0, "blocks.1.ln_1": 3.0, "blocks.1": 8.0}
    n = _numbers(drift, {("head", 0): 2.5, ("head", 10): 1.5})
    assert n.value("grad_norm/0/head") == 2.5 and n.value("grad_norm/10/head") == 1.5
    assert n.value("grad_norm/5/head") is None  # no record at that step
    assert n.value("log10/grad_norm/0/head") == pytest.approx(np.log10(2.5))
    assert n.value("batch_stats/design_effect/blocks.1.ln_1.norm") == 5.0
    assert n.value("batch_stats/design_effect/mean") == 4.0
    assert n.value("batch_stats/var_cv/mean") is None
    assert n.value("drift/mean") == pytest.approx(4.0)
    assert n.value("drift/mean:blocks.*.ln_1") == pytest.approx(2.0)
    assert n.value("drift/mean:blocks.*") == pytest.approx(6.0)  # one dotted part
    # a layer whose name starts with "mean" is that layer, not an average
    named = _numbers({"mean_pool": 2.0, "head": 6.0}, {})
    assert named.value("drift/mean_pool") == 2.0 and named.value("drift/mean") == 4.0


def test_a_mean_over_layers_is_not_measurable_if_one_layer_is_not() -> None:
    n = _numbers({"blocks.0.ln_1": 1.0, "blocks.1.ln_1": 3.0}, {})
    n.figures[("drift", "blocks.0.ln_1")] = Figure(1.0, True, "4 of 4 units", 4)
    why = "not measurable: 4 of 4 units saturated"
    n.figures[("drift", "blocks.1.ln_1")] = Figure(None, False, why, 4, saturated=4)
    reading = n.reading("drift/mean:blocks.*.ln_1")
    assert reading.value is None and reading.reason == f"blocks.1.ln_1: {why}"
    assert (reading.excluded, reading.units) == (4, 8)
    assert n.reading("drift/mean:blocks.0.*").value == 1.0


GRID = """
name = "g"
title = "g"
dataset = "synthetic"
seeds = [0, 1, 2]
steps = 100
eval_every = 50
[networks.post]
label = "post"
norm = "none"
"""


def test_layer_trend_along_a_glob_of_weight_layers_and_of_probed_layers(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            GRID
            + """
[[claims]]
text = "gradient norm at init grows towards the output"
statistic = "layer_trend"
method = "slope"
metric = "log10/grad_norm/0/blocks.*.mlp.c_proj"
network = "post"
rule = "greater"
[[claims]]
text = "the stream's drift grows with depth"
statistic = "layer_trend"
metric = "drift/blocks.*"
network = "post"
rule = "greater"
""",
        )
    )
    points = expand_grid(config)
    table = {}
    for p in points:
        grads = {(f"blocks.{i}.mlp.c_proj", 0): 10.0 ** (i * (1 + p.seed)) for i in range(12)}
        grads |= {(f"blocks.{i}.mlp.c_fc", 0): 1.0 for i in range(12)}
        grads[("head", 0)] = 1e9
        drift = {f"blocks.{i}": float(i * i) for i in range(12)}
        drift |= {f"blocks.{i}.ln_1": -float(i) for i in range(12)}
        table[p.id] = _numbers(drift, grads)
    slope, trend = evaluate_claims(config, "e", points, table)
    # log10 norms i * (1 + seed) along blocks 0..11, in the order recorded
    assert slope["per_seed"] == {str(s): pytest.approx(1.0 + s) for s in config.seeds}
    assert trend["per_seed"] == {str(s): pytest.approx(1.0) for s in config.seeds}
    assert trend["data"]["0"]["layers"] == [f"blocks.{i}" for i in range(12)]


def test_preflight_checks_the_globs_of_claims_against_the_probed_layers(tmp_path: Path) -> None:
    from covshift.experiments.config import ConfigError
    from covshift.experiments.preflight import _check_claim_layers

    def config(metric: str, statistic: str = "value"):
        claim = f'[[claims]]\ntext = "t"\nstatistic = "{statistic}"\nmetric = "{metric}"\n'
        claim += 'network = "post"\nrule = "greater"\n'
        return load_config(write(tmp_path, GRID + claim))

    probed = {"post": ["blocks.0", "blocks.0.ln_1", "blocks.1", "blocks.1.ln_1"]}
    for ok in ("drift/mean", "drift/mean:blocks.*.ln_1", "drift/blocks.1"):
        _check_claim_layers(config(ok), probed)
    _check_claim_layers(config("drift/blocks.*", "layer_trend"), probed)
    with pytest.raises(ConfigError, match=r"no layer that network 'post' probes matches 'x\.\*'"):
        _check_claim_layers(config("drift/mean:x.*"), probed)
    with pytest.raises(ConfigError, match=r"matches 'hidden\.\*\.act'"):
        _check_claim_layers(config("drift/hidden.*.act", "layer_trend"), probed)
    with pytest.raises(ConfigError, match=r"probes blocks\.0, .*not 'blocks\.7'"):
        _check_claim_layers(config("drift/blocks.7"), probed)
