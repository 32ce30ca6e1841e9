"""Experiments recorded by covshift 0.1 (store schema 1) are adopted into the grid."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from covshift.experiments import expand_grid, load_config, stored_config, summarize
from covshift.store import Store

from ..test_store import _V1_SCHEMA


def test_a_schema_1_experiment_is_adopted_and_reported(tmp_path: Path) -> None:
    config = load_config("ioffe2015", {"seeds": "[5]", "steps": "500"})
    old = config.model_dump(mode="json")
    old.pop("seeds"), old.pop("sweep"), old.pop("divergence")
    old["seed"] = 5
    old["claims"] = [
        {
            "text": "t",
            "metric": "test_accuracy/final",
            "better": "batchnorm",
            "than": "baseline",
            "direction": "not_lower",
        }
    ]
    db = tmp_path / "v1.db"
    con = sqlite3.connect(db)
    con.executescript(_V1_SCHEMA.split("INSERT INTO runs")[0])
    for i, network in enumerate(("baseline", "batchnorm"), start=1):
        cfg = {"experiment": old, "network": network, "model": {}, "data_source": "x"}
        con.execute(
            "INSERT INTO runs (id, name, experiment, config, seed, status, started_at, last_step,"
            " python_version, covshift_version) VALUES (?, ?, 'ioffe2015-old', ?, 5, 'finished',"
            " '2026-11-25', 500, '3.11', '0.1.0')",
            (i, f"ioffe2015/{network}", json.dumps(cfg)),
        )
        con.execute("INSERT INTO scalars VALUES (?, 'test_accuracy', 0, 0.1)", (i,))
        con.execute("INSERT INTO scalars VALUES (?, 'test_accuracy', 500, ?)", (i, 0.7 + 0.1 * i))
    con.commit()
    con.close()
    with Store(db) as store:
        adopted = stored_config(store, "ioffe2015-old")
        assert adopted.seeds == (5,) and adopted.claims[0].rule == "not_less"
        points = {p.network: p.id for p in expand_grid(adopted)}
        assert {r.point for r in store.runs()} == set(points.values())
        summary = summarize(store, "ioffe2015-old", adopted)
        finals = {n: c["test_accuracy"]["final"] for n, c in summary["networks"].items()}
        assert finals == {"baseline": pytest.approx(0.8), "batchnorm": pytest.approx(0.9)}
        assert summary["claims"][0]["verdict"] == "inconclusive"  # one seed
        assert store.experiment_config("ioffe2015-old") is not None  # recorded now
