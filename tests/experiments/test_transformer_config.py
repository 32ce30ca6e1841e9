"""model.kind = "transformer" and the optimizer's kind in experiment configs: defaults,
errors that name the field, the point identities of older configs, and a whole
``covshift run`` of a small language-model TOML (train, probe, store, report)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from covshift.experiments.config import ExperimentConfig, ModelSpec, OptimizerSpec
from covshift.experiments.grid import expand_grid, experiment_id

LM = """
name = "lm-test"
title = "a byte-level transformer on synthetic text"
dataset = "synthetic-text"
seeds = 1
steps = 40
batch_size = 8
eval_every = 20
test_examples = 64

[model]
kind = "transformer"
width = 32
depth = 2
heads = 2
context = 32
norm = "layer"

[optimizer]
kind = "adamw"
lr = 0.003
warmup_steps = 10

[probe]
layers = ["auto"]
every = 20
examples = 16

[sweep]
model.norm_position = ["pre", "post"]
"""


def test_transformer_defaults() -> None:
    spec = ModelSpec(kind="transformer")
    assert (spec.norm_position, spec.init, spec.heads, spec.context) == ("pre", "gpt2", 4, 128)
    assert ModelSpec().norm_position == "before" and ModelSpec().init == "gaussian"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"kind": "transformer", "norm": "group"},
            "a transformer takes none, layer, rms, dyt, batch, ghost_batch",
        ),
        ({"kind": "transformer", "norm_position": "before"}, "placed pre or post"),
        ({"kind": "transformer", "activation": "relu"}, "activation: a transformer does not use"),
        ({"kind": "transformer", "init": "xavier"}, "init is gpt2 or unit"),
        ({"kind": "transformer", "width": 30, "heads": 4}, "multiple of heads = 4"),
        ({"kind": "mlp", "heads": 8}, "heads: only a transformer has it"),
        ({"kind": "mlp", "norm_position": "pre"}, "pre and post are a transformer's"),
        ({"kind": "cnn", "init": "gpt2"}, "'gpt2' is a transformer's init"),
    ],
)
def test_model_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "adamw", "momentum": 0.9}, "momentum is SGD's"),
        ({"betas": [0.9, 0.95]}, "betas are AdamW's"),
        ({"kind": "adamw", "betas": [0.9, 1.0]}, r"betas must be in \[0, 1\)"),
        ({"kind": "adam"}, "'sgd' or 'adamw'"),
        ({"warmup_steps": -1}, "greater than or equal to 0"),
    ],
)
def test_optimizer_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OptimizerSpec.model_validate(fields)


def test_text_and_transformer_go_together() -> None:
    base = {"name": "x", "title": "t"}
    with pytest.raises(ValidationError, match="trains on text, and dataset 'fashion-mnist'"):
        ExperimentConfig.model_validate({**base, "model": {"kind": "transformer"}})
    with pytest.raises(ValidationError, match=r"is text .* model\.kind must be 'transformer'"):
        ExperimentConfig.model_validate({**base, "dataset": "synthetic-text"})
    lm = {**base, "dataset": "synthetic-text", "model": {"kind": "transformer"}}
    mlp = {"label": "a", "kind": "mlp"}  # a network of another kind: its fields clash
    with pytest.raises(ValidationError, match=r"networks\.a: norm_position: before or after"):
        ExperimentConfig.model_validate({**lm, "networks": {"a": mlp}})


def test_a_network_sets_its_own_init() -> None:
    # transformer-norms' DyT control trains under the unit-scale init beside GPT-2's
    lm = {"name": "x", "title": "t", "dataset": "synthetic-text"}
    model = {"kind": "transformer", "norm": "dyt"}
    networks = {"gpt2": {"label": "a"}, "unit": {"label": "b", "init": "unit"}}
    config = ExperimentConfig.model_validate({**lm, "model": model, "networks": networks})
    inits = {p.network: p.spec.model.init for p in expand_grid(config)}
    assert inits == {"gpt2": "gpt2", "unit": "unit"}
    # the network's init is the model's: GPT-2's init points keep their identity
    plain = ExperimentConfig.model_validate({**lm, "model": model})
    ids = {p.network: p.id for p in expand_grid(config)}
    assert expand_grid(plain)[0].id == ids["gpt2"] != ids["unit"]
    with pytest.raises(ValidationError, match=r"networks\.b: init: 'unit' is a transformer's init"):
        ExperimentConfig.model_validate(
            {"name": "x", "title": "t", "networks": {"b": {"label": "b", "init": "unit"}}}
        )


def test_experiment_ids_leave_out_a_network_without_its_own_init() -> None:
    # (computed before NetworkSpec.init existed)
    config = ExperimentConfig.model_validate(
        {"name": "pin", "title": "t", "networks": {"a": {"label": "a", "norm": "batch"}}}
    )
    assert experiment_id(config) == "pin-01e07a57"


def test_points_recorded_before_keep_their_identity() -> None:
    # computed with covshift before the transformer fields existed
    config = ExperimentConfig.model_validate(
        {
            "name": "pin",
            "title": "t",
            "steps": 100,
            "model": {"kind": "mlp", "width": 16, "depth": 2},
            "optimizer": {"lr": 0.1, "momentum": 0.5},
        }
    )
    assert [p.id for p in expand_grid(config)] == ["fd94bddc277ede7e"]


@pytest.mark.slow
def test_covshift_run_trains_probes_stores_and_reports(tmp_path: Path) -> None:
    (tmp_path / "lm.toml").write_text(LM)
    proc = subprocess.run(
        [sys.executable, "-m", "covshift.cli", "run", "lm.toml", "--json", "-q", "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["optimizer"]["kind"] == "adamw"
    layers = {f"blocks.{i}.{m}" for i in range(2) for m in ("ln_1", "ln_2", "mlp.act")}
    for cell in summary["cells"]:
        assert cell["status"] == {"finished": 1} and cell["final_step"] == 40
        pre = cell["axes"]["model.norm_position"] == "pre"
        assert set(cell["drift"]) == (layers | {"ln_f"} if pre else layers)
    for point in summary["points"]:
        assert 0 < point["test_bpb"]["final"] < 8  # below uniform over bytes
    db = sqlite3.connect(tmp_path / "covshift-out" / "covshift.db")
    names = {n for (n,) in db.execute("select distinct name from scalars")}
    assert {"test_bpb", "train_bpb", "test_loss", "train_loss", "test_accuracy"} <= names
    dims = {d for (d,) in db.execute("select distinct unit_dim from probe_records")}
    assert dims == {2}  # every record's units: the features, last axis of (N, T, C)
    report = (tmp_path / summary["report"]).read_text()
    assert "decoder-only transformer, 2 blocks, d_model 32" in report
    assert "AdamW, lr 0.003" in report and "warm-up over 10 steps" in report


@pytest.mark.slow
def test_ray_backend_gives_the_local_numbers(tmp_path: Path) -> None:
    # Ray ships the dataset to its tasks: a text dataset travels as its byte streams.
    pytest.importorskip("ray", reason="the ray extra: pip install 'covshift[ray]'")
    (tmp_path / "lm.toml").write_text(LM)

    def run(*extra: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "covshift.cli", "run", "lm.toml", "--json", "-q", *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    local = run("--workers", "2", "--threads", "1", "--db", "local.db")
    ray = run("--backend", "ray", "--db", "ray.db")
    strip = [{k: v for k, v in c.items() if k != "run_ids"} for c in local["cells"]]
    assert strip == [{k: v for k, v in c.items() if k != "run_ids"} for c in ray["cells"]]
