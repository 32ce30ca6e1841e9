"""The pre-registration record: the claims' hash, when the store first saw it, and
rules changed after results existed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from covshift.experiments import load_config, run_experiment
from covshift.experiments.preregistration import claims_hash, preregistration
from covshift.experiments.sweep import plan_sweep, record_experiment
from covshift.store import Store

from .helpers import SMALL_SWEEP, sweep_file

TINY = SMALL_SWEEP.replace("seeds = 3", "seeds = 1").replace(
    "optimizer.lr = [0.1, 0.5, 2.0]", "optimizer.lr = [0.5]"
)


def test_hash_covers_the_claims_and_nothing_else(tmp_path: Path) -> None:
    config = load_config(str(sweep_file(tmp_path, TINY)))
    dumped = [c.model_dump(mode="json", exclude={"axis_ends"}) for c in config.claims]
    expected = hashlib.sha256(
        json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    assert claims_hash(config) == expected
    longer = load_config(str(sweep_file(tmp_path, TINY.replace("steps = 60", "steps = 80"))))
    assert claims_hash(longer) == claims_hash(config)  # a size is not a rule
    margin = load_config(
        str(
            sweep_file(tmp_path, TINY.replace('rule = "greater"', 'rule = "greater"\nvalue = 0.01'))
        )
    )
    assert claims_hash(margin) != claims_hash(config)


def test_a_rule_changed_after_results_is_shown_with_both_versions(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    first = load_config(str(sweep_file(tmp_path, TINY)))
    with Store(db) as store:
        record_experiment(plan_sweep(first, db), store)
        record = preregistration(store, first)
        assert record["hash"] == claims_hash(first) and record["changes"] == []
        assert record["first_recorded"] is not None
        run_experiment(first, store)  # results now exist for this version
        # No sleep: both versions are usually recorded within the timestamps' one second.
        changed_text = TINY.replace('rule = "greater"', 'rule = "greater"\nvalue = 0.01')
        second = load_config(str(sweep_file(tmp_path, changed_text)))
        record_experiment(plan_sweep(second, db), store)
    # Both versions recorded within one second (the timestamps' resolution): the
    # order they were recorded in still says which came first.
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE experiments SET created_at = '2026-12-06T12:00:00+00:00'")
    with Store(db) as store:
        record = preregistration(store, second)
        assert preregistration(store, first)["changes"] == []  # the older is no change
    assert record["hash"] == claims_hash(second)
    (change,) = record["changes"]
    assert change["hash"] == claims_hash(first)
    assert change["first_recorded"] <= record["first_recorded"]
    (diff,) = change["differences"]
    assert diff["fields"] == ["value"]
    assert diff["before"] == {"value": 0.0} and diff["after"] == {"value": 0.01}


def test_a_version_without_results_is_not_a_change(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    first = load_config(str(sweep_file(tmp_path, TINY)))
    second = load_config(
        str(sweep_file(tmp_path, TINY.replace('rule = "greater"', 'rule = "less"')))
    )
    with Store(db) as store:
        record_experiment(plan_sweep(first, db), store)  # recorded, never run
        record_experiment(plan_sweep(second, db), store)
        assert preregistration(store, second)["changes"] == []


def test_an_axis_end_is_the_same_rule_at_every_size(tmp_path: Path) -> None:
    # where = { "optimizer.lr" = "largest" } resolves to 0.5 at one size and 2.0 at
    # another: one rule, one hash, and neither size a change of the other
    text = SMALL_SWEEP.replace("seeds = 3", "seeds = 1").replace(
        'rule = "greater"', 'rule = "greater"\nwhere = { "optimizer.lr" = "largest" }'
    )
    small = load_config(str(sweep_file(tmp_path, text.replace("[0.1, 0.5, 2.0]", "[0.1, 0.5]"))))
    large = load_config(str(sweep_file(tmp_path, text)))
    assert small.claims[0].where == {"optimizer.lr": 0.5}
    assert large.claims[0].where == {"optimizer.lr": 2.0}
    assert claims_hash(small) == claims_hash(large)
    other = load_config(str(sweep_file(tmp_path, text.replace('"largest"', '"smallest"'))))
    assert claims_hash(other) != claims_hash(large)
    db = tmp_path / "c.db"
    with Store(db) as store:
        record_experiment(plan_sweep(small, db), store)
        run_experiment(small, store)  # results exist for the small size
        record_experiment(plan_sweep(large, db), store)
        record = preregistration(store, large)
    assert record["changes"] == [] and record["hash"] == claims_hash(small)
