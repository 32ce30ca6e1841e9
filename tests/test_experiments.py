"""Experiment configs, the runner (store contents, resume), the summary and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covshift.experiments import ConfigError, load_config, preset_names
from covshift.experiments.config import ClaimSpec, apply_overrides
from covshift.experiments.runner import run_experiment, stored_config
from covshift.experiments.summary import evaluate_claim, summarize
from covshift.report import write_report
from covshift.store import Store

QUICK = {
    "dataset": "synthetic",
    "steps": "60",
    "eval_every": "20",
    "probe.every": "20",
    "probe.examples": "100",
    "model.width": "16",
    "batch_size": "30",
}


def test_ioffe2015_preset_is_the_paper_setup() -> None:
    config = load_config("ioffe2015")
    assert "ioffe2015" in preset_names()
    assert (config.steps, config.batch_size, config.dataset) == (50_000, 60, "fashion-mnist")
    m = config.model
    assert (m.kind, m.depth, m.width, m.activation, m.norm_position) == (
        "mlp",
        3,
        100,
        "sigmoid",
        "before",
    )
    norms = {k: n.resolve(m).norm for k, n in config.networks.items()}
    assert norms == {"baseline": "none", "batchnorm": "batch"}
    assert config.probe.quantiles == (0.15, 0.5, 0.85)
    assert {"optimizer", "init", "bn_eps", "bn_momentum"} <= set(config.choices)


def test_overrides_are_typed() -> None:
    config = load_config(
        "ioffe2015",
        {"steps": "7", "optimizer.lr": "0.25", "probe.layers": '["hidden.2.act"]', "device": "cpu"},
    )
    assert config.steps == 7 and config.optimizer.lr == 0.25
    assert config.probe.layers == ("hidden.2.act",) and config.device == "cpu"
    assert apply_overrides({"a": {"b": 1}}, {"a.c": "x"}) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer.lrr": "1"}, r"optimizer\.lrr: Extra inputs are not permitted"),
        ({"steps": "-3"}, r"steps: Input should be greater than or equal to 1"),
        ({"model.norm": "foo"}, r"model\.norm: unknown normalization 'foo'"),
        ({"networks.batchnorm.norm": "foo"}, r"networks\.batchnorm: norm: unknown normalization"),
        ({"probe.quantiles": "[0.5]"}, "at least two increasing levels"),
        ({"steps.x": "1"}, r"'steps' is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("ioffe2015", overrides)


def test_unknown_preset_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'; shipped presets: ioffe2015"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nsteps = = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML: .*line 2"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_claim_verdicts() -> None:
    nets = {
        "a": {"test_accuracy": {"1000": 0.9}, "drift": {"l.0": 0.2}},
        "b": {"test_accuracy": {"1000": 0.8}, "drift": {"l.0": 0.5}},
    }
    hi = ClaimSpec(text="t", metric="test_accuracy/1000", better="a", than="b", direction="higher")
    lo = ClaimSpec(text="t", metric="drift/l.0", better="a", than="b", direction="lower")
    wrong = ClaimSpec(text="t", metric="drift/l.0", better="b", than="a", direction="lower")
    missing = ClaimSpec(
        text="t", metric="test_accuracy/5000", better="a", than="b", direction="higher"
    )
    assert evaluate_claim(hi, nets)["verdict"] == "holds"
    assert evaluate_claim(lo, nets)["verdict"] == "holds"
    assert evaluate_claim(wrong, nets)["verdict"] == "does not hold"
    assert evaluate_claim(missing, nets)["verdict"] == "not measured"
    tie = {"a": {"x": 1.0}, "b": {"x": 1.0}}
    for direction, verdict in [
        ("higher", "does not hold"),
        ("not_lower", "holds"),
        ("lower", "does not hold"),
        ("not_higher", "holds"),
    ]:
        claim = ClaimSpec(text="t", metric="x", better="a", than="b", direction=direction)
        assert evaluate_claim(claim, tie)["verdict"] == verdict


def test_run_summary_and_report(tmp_path: Path) -> None:
    config = load_config("ioffe2015", QUICK)
    with Store(tmp_path / "c.db") as store:
        result = run_experiment(config, store)
        runs = {r.config["network"]: r for r in store.runs(experiment=result.experiment_id)}
        assert set(runs) == {"baseline", "batchnorm"}
        assert all(r.status == "finished" and r.last_step == 60 for r in runs.values())
        assert runs["batchnorm"].config["model"]["norm"] == "batch"
        assert runs["baseline"].config["experiment"]["steps"] == 60
        steps, acc = store.scalars(runs["baseline"].id, "test_accuracy")
        assert list(steps) == [0, 20, 40, 60]
        psteps, q = store.probe(runs["batchnorm"].id, "hidden.2.act", "quantiles")
        assert list(psteps) == [0, 20, 40, 60] and q.shape == (4, 3, 16)

        summary = summarize(store, result.experiment_id, config)
        base = summary["networks"]["baseline"]
        assert base["test_accuracy"]["final"] == pytest.approx(acc[-1])
        assert base["test_accuracy"]["1000"] is None  # run shorter than the checkpoint
        assert set(base["drift"]) == {"hidden.0.act", "hidden.1.act", "hidden.2.act"}
        assert all(np.isfinite(v) and v >= 0 for v in base["drift"].values())
        assert summary["claims"][0]["verdict"] == "not measured"
        assert stored_config(store, result.experiment_id) == config

        index = write_report(store, result.experiment_id, config, summary, tmp_path / "rep")
        page = index.read_text()
        for name in ("figure.png", "figure.svg", "summary.json"):
            assert (tmp_path / "rep" / name).stat().st_size > 1000 or name == "summary.json"
        assert "data:image/png;base64," in page
        assert f"{base['test_accuracy']['final']:.4f}" in page
        assert "Choices the paper leaves open" in page and "Plain SGD" in page
        assert json.loads((tmp_path / "rep" / "summary.json").read_text()) == summary


class Interrupt:
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state) -> None:
        if state.step == self.at:
            raise KeyboardInterrupt


def test_interrupted_experiment_resumes_to_the_same_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config("ioffe2015", QUICK)
    with Store(tmp_path / "straight.db") as store:
        straight = run_experiment(config, store)
        expected = summarize(store, straight.experiment_id, config)["networks"]

    import covshift.experiments.runner as runner

    real_train = runner.train
    calls = {"n": 0}

    def train_interrupted_in_second_network(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            kwargs["callbacks"] = [*kwargs["callbacks"], Interrupt(45)]
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", train_interrupted_in_second_network)
    with Store(tmp_path / "c.db") as store:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, store)
        (bn, base) = store.runs()
        assert (base.status, bn.status) == ("finished", "interrupted")
        assert bn.last_step == 40  # what was recorded stays
        monkeypatch.setattr(runner, "train", real_train)
        resumed = run_experiment(config, store, resume=base.experiment)
        assert resumed.run_ids == {"baseline": base.id, "batchnorm": bn.id}
        assert [r.status for r in store.runs()] == ["finished", "finished"]
        got = summarize(store, base.experiment, config)["networks"]
    for key in expected:
        got[key].pop("run_id"), expected[key].pop("run_id")
    assert got == expected
