"""Experiment configs: presets, overrides, seeds, sweep axes, claims; errors that name
the file, the key and what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from covshift.experiments import ConfigError, load_config, preset_names
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.config_files import apply_overrides

SWEEP = """
name = "lr-sweep"
title = "a sweep"
dataset = "synthetic"
seeds = 3
steps = 60
eval_every = 20
[model]
width = 16
[probe]
every = 20
examples = 100
[sweep]
optimizer.lr = [0.05, 0.2, 0.8]
model.depth = [1, 2]
[networks.plain]
label = "plain"
norm = "none"
[networks.bn]
label = "BN"
norm = "batch"
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


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
    assert config.seeds == (0, 1, 2) and config.sweep == {}
    assert {"optimizer", "init", "bn_eps", "bn_momentum", "seeds"} <= set(config.choices)
    assert [c.rule for c in config.claims] == ["greater", "greater", "not_less"] + ["less"] * 5
    assert config.probe.mode == "both" and set(config.sizes) == {"quick", "full"}


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
        ({"optimizer.lrr": "1"}, r"optimizer\.lrr: unknown field \(did you mean lr\?\); valid"),
        ({"model.widht": "3"}, r"model\.widht: unknown field \(did you mean width\?\)"),
        ({"steps": "-3"}, r"steps: Input should be greater than or equal to 1"),
        ({"model.norm": "foo"}, r"model\.norm: unknown normalization 'foo'"),
        ({"networks.batchnorm.norm": "foo"}, r"networks\.batchnorm: norm: unknown normalization"),
        ({"probe.quantiles": "[0.5]"}, "at least two increasing levels"),
        ({"steps.x": "1"}, r"'steps' is a value, not a section"),
        ({"seeds": "0"}, r"seeds = 0: a count of seeds must be at least 1"),
        ({"seeds": "[1, 1]"}, r"seeds: .*repeat a seed"),
        ({"seeds": f"[{2**63}]"}, r"seed 9223372036854775808 is out of range"),
        ({"seeds": "[-1]"}, r"seed -1 is out of range"),
    ],
)
def test_bad_overrides_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("ioffe2015", overrides)


def test_seeds_as_count_list_and_legacy_single_seed(tmp_path: Path) -> None:
    assert load_config("ioffe2015", {"seeds": "5"}).seeds == (0, 1, 2, 3, 4)
    assert load_config("ioffe2015", {"seeds": "[7, 3]"}).seeds == (7, 3)
    legacy = write(tmp_path, SWEEP.replace("seeds = 3", "seed = 4"))
    assert load_config(legacy).seeds == (4,)
    both = write(tmp_path, SWEEP.replace("seeds = 3", "seeds = 3\nseed = 4"), "both.toml")
    with pytest.raises(ConfigError, match=r"give seeds .* or seed, not both"):
        load_config(both)
    # An override of the seeds replaces whichever form the file used.
    assert load_config(legacy, {"seeds": "2"}).seeds == (0, 1)


def test_sweep_axes_from_toml_dotted_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SWEEP))
    assert config.sweep == {"optimizer.lr": (0.05, 0.2, 0.8), "model.depth": (1, 2)}
    # --set can replace an axis, and add a norm-keyword axis
    config = load_config(
        write(tmp_path, SWEEP),
        {"sweep.optimizer.lr": "[0.1]", "sweep.model.norm_kwargs.momentum": "[0.1, 0.01]"},
    )
    assert config.sweep["optimizer.lr"] == (0.1,)
    assert config.sweep["model.norm_kwargs.momentum"] == (0.1, 0.01)


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (
            ("optimizer.lr = [", "optimizer.lrr = ["),
            r"sweep\.optimizer\.lrr: 'lrr' is not a field that can be swept \(did you mean lr\?\);"
            r" accepted: betas, decay, kind, lr, lr_reference_batch, momentum, warmup_steps,"
            r" weight_decay",
        ),
        (
            ("model.depth", "modle.depth"),
            r"sweep\.modle: 'modle' is not a field that can be swept \(did you mean model\?\)",
        ),
        (("[0.05, 0.2, 0.8]", "[]"), r"sweep\.optimizer\.lr: the axis is empty"),
        (("[0.05, 0.2, 0.8]", "0.05"), r"sweep\.optimizer\.lr: an axis is an array of values"),
        (("[0.05, 0.2, 0.8]", "[0.05, 0.05]"), r"sweep\.optimizer\.lr: value 0\.05 appears twice"),
        (
            ("[0.05, 0.2, 0.8]", "[0.05, -0.2]"),
            r"sweep\.optimizer\.lr\[1\] = -0\.2: optimizer\.lr: Input should be greater than 0",
        ),
        (("[1, 2]", "[1, 0]"), r"sweep\.model\.depth\[1\] = 0: model\.depth: .*greater than"),
        (
            ("model.depth = [1, 2]", 'model.activation = ["relu", "swish"]'),
            r"sweep\.model\.activation\[1\] = 'swish': model\.activation: Input should be",
        ),
        (
            ("model.depth = [1, 2]", 'model.norm = ["batch", "layer"]'),
            r"sweep\.model\.norm: network 'plain' sets norm itself",
        ),
    ],
)
def test_malformed_sweeps_name_file_key_and_what_is_accepted(
    tmp_path: Path, replace: tuple[str, str], message: str
) -> None:
    path = write(tmp_path, SWEEP.replace(*replace))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}")


def test_toml_syntax_and_encoding_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown preset .nope.; shipped presets: activations, .*ioffe2015"
    ):
        load_config("nope")
    bad = write(tmp_path, "name = 'x'\nsteps = = 3\n", "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML: .*line 2"):
        load_config(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("title = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.toml: not UTF-8 text"):
        load_config(str(latin))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_a_swept_field_cannot_be_overridden_by_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--set optimizer\.lr: .* sweeps optimizer\.lr"):
        load_config(write(tmp_path, SWEEP), {"optimizer.lr": "0.1"})


CLAIM = """
[[claims]]
text = "BN is better"
metric = "test_accuracy/final"
network = "bn"
baseline = "plain"
rule = "greater"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('network = "bnn"', r"claims\[0\]\.network: 'bnn' is not a network \(did you mean bn\?\)"),
        ('metric = "test_acuracy/final"', r"unknown metric"),
        ('metric = "test_accuracy/late"', r"'late' is not a step, final, max or min"),
        ('rule = "bigger"', r"claims\[0\]\.rule: Input should be"),
        (
            'where = { "optimizer.lrr" = 0.2 }',
            r"claims\[0\]\.where: 'optimizer\.lrr' is not a sweep",
        ),
        ('where = { "optimizer.lr" = 0.3 }', r"optimizer\.lr = 0\.3 is not on the axis"),
        ('statistic = "trend"', r"a trend claim needs the sweep axis"),
        ('statistic = "threshold"\naxis = "optimizer.lr"', r"needs a target"),
        (
            'statistic = "threshold"\naxis = "model.width"\ntarget = 0.5',
            r"claims\[0\]\.axis: 'model\.width' is not a sweep axis",
        ),
        ("interaction = true", r"claims\[0\]: interaction = true compares a difference"),
        ('statistic = "value"', r"claims\[0\]: a value claim is one network's metric"),
        ('statistic = "layer_trend"', r"claims\[0\]: a layer_trend claim runs along the probed"),
    ],
)
def test_malformed_claims(tmp_path: Path, extra: str, message: str) -> None:
    lines = [line for line in CLAIM.splitlines() if not line.startswith(extra.split(" ")[0] + " ")]
    path = write(tmp_path, SWEEP + "\n".join(lines) + "\n" + extra + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_legacy_claims_convert_to_rules() -> None:
    raw = load_config("ioffe2015").model_dump(mode="json")
    raw["claims"] = [
        {
            "text": "t",
            "metric": "drift/hidden.2.act",
            "better": "batchnorm",
            "than": "baseline",
            "direction": "lower",
        },
        {
            "text": "t",
            "metric": "test_accuracy/final",
            "better": "batchnorm",
            "than": "baseline",
            "direction": "not_lower",
        },
    ]
    config = ExperimentConfig.model_validate(raw)
    assert [(c.network, c.baseline, c.rule) for c in config.claims] == [
        ("batchnorm", "baseline", "less"),
        ("batchnorm", "baseline", "not_less"),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # no silent coercion: a boolean or a quoted number is not an integer
        ({"steps": "true"}, r"steps: expected an integer, got true \(a boolean\)"),
        ({"model.width": '"8"'}, r'model\.width: expected an integer, got "8" \(a string'),
        ({"model.depth": "2.0"}, r"model\.depth: expected an integer, got 2\.0"),
        ({"optimizer.lr": '"0.1"'}, r"optimizer\.lr: expected a number, got \"0\.1\""),
        ({"probe.noise_floor": "1"}, r"probe\.noise_floor: expected true or false, got 1"),
        ({"probe.every": "true"}, r"probe\.every: expected an integer, got true"),
        ({"seeds": "[true]"}, r"seeds\[0\]: expected an integer, got true"),
        ({"model.depth": "100000"}, r"model\.depth: Input should be less than or equal to 10000"),
        ({"seeds": "100000000"}, r"seeds = 100000000: a count of seeds must be at most 10,000"),
    ],
)
def test_types_are_strict_and_sizes_bounded(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("ioffe2015", overrides)


def test_a_float_field_takes_an_integer() -> None:
    config = load_config("ioffe2015", {"optimizer.lr": "1", "model.init_std": "2"})
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.model.init_std == 2.0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[networks.plain]\nlabel = "plain"\nwidht = 3\n',
            r"networks\.plain\.widht: unknown field \(did you mean width\?\); valid keys here: "
            r"label, kind, width, depth",
        ),
        (
            '[battery]\nmetrc = "test_loss"\n',
            r"battery\.metrc: unknown field \(did you mean metric\?\); valid keys here: "
            r"metric, target",
        ),
        (
            '[[claims]]\ntext = "t"\nmetric = "test_accuracy/final"\nnetwork = "plain"\n'
            'rule = "greater"\nrulee = 1\n',
            r"claims\[0\]\.rulee: unknown field \(did you mean rule\?\); valid keys here: text,",
        ),
        (
            "[sizes.quick]\nset = {}\nminuts = 3\n",
            r"sizes\.quick\.minuts: unknown field \(did you mean minutes\?\)",
        ),
    ],
)
def test_unknown_keys_in_every_section_list_the_valid_ones(
    tmp_path: Path, table: str, message: str
) -> None:
    text = SWEEP.replace('[networks.plain]\nlabel = "plain"\nnorm = "none"\n', "") + table
    if "networks.plain" not in table:
        text += '[networks.plain]\nlabel = "plain"\n'
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("metric", "needs"),
    [
        ("ics_cos/mean", r"set probe\.gradient_ics_every to a step count > 0"),
        ("ics_l2/hidden.0.linear", r"set probe\.gradient_ics_every to a step count > 0"),
        ("smooth/loss_range", r"set probe\.smoothness_every to a step count > 0"),
        ("floor/hidden.0.act", r"set probe\.noise_floor to true"),
        ("drift/hidden.0.act@train", r'set probe\.mode to "train" or "both"'),
    ],
)
def test_a_claim_on_an_unmeasured_metric_is_refused(
    tmp_path: Path, metric: str, needs: str
) -> None:
    claim = (
        f'[[claims]]\ntext = "t"\nstatistic = "value"\nmetric = "{metric}"\n'
        'network = "bn"\nrule = "greater"\n'
    )
    with pytest.raises(ConfigError, match=rf"claims\[0\]\.metric: .* is not measured .*{needs}"):
        load_config(write(tmp_path, SWEEP + claim))
    # measured once the probe is set to: accepted (also when only a sweep value sets it)
    enable = {
        "ics": "gradient_ics_every = 10",
        "smo": "smoothness_every = 10",
        "flo": "noise_floor = true",
        "dri": 'mode = "both"',
    }[metric[:3]]
    fixed = SWEEP.replace("examples = 100", f"examples = 100\n{enable}") + claim
    assert load_config(write(tmp_path, fixed, "ok.toml")).claims[0].metric == metric


def _ends_config(sweep: dict, where: dict, baseline_where: dict | None = None) -> ExperimentConfig:
    claim = {
        "id": "c",
        "text": "t",
        "margin_reason": "r",
        "metric": "test_accuracy/final",
        "network": "default",
        "statistic": "value",
        "where": where,
        "rule": "greater",
    }
    if baseline_where is not None:
        claim.update(statistic="difference", baseline_where=baseline_where)
    return ExperimentConfig.model_validate(
        {
            "name": "e",
            "title": "t",
            "examples": 600,
            "batch_size": 10,
            "model": {"kind": "mlp", "width": 8, "depth": 1},
            "sweep": sweep,
            "claims": [claim],
        }
    )


def test_a_claim_names_the_ends_of_an_axis() -> None:
    # one claim for every size: "largest"/"smallest" become that size's axis ends
    for values in ([300, 600], [600, 1200, 2400]):
        config = _ends_config(
            {"examples": values}, {"examples": "largest"}, {"examples": "smallest"}
        )
        (claim,) = config.claims
        assert claim.where == {"examples": max(values)}
        assert claim.baseline_where == {"examples": min(values)}
    with pytest.raises(
        ValidationError, match=r"where\.model\.norm = 'largest' needs a numeric axis"
    ):
        _ends_config({"model.norm": ["batch", "none"]}, {"model.norm": "largest"})
    with pytest.raises(ValidationError, match=r"'examples' is not a sweep axis"):
        _ends_config({"batch_size": [10, 20]}, {"examples": "largest"})
