"""covshift.experiments.claim_result: reading a result's JSON object."""

from __future__ import annotations

from dataclasses import MISSING
from dataclasses import fields as _fields

from covshift.experiments.claim_result import ClaimResult, verdict_p_adjusted


def fields_of(cls: type) -> dict:
    return {f.name: f for f in _fields(cls)}


def test_the_adjusted_p_behind_each_verdict() -> None:
    result = {"p_adjusted": 0.004, "p_adjusted_contradict": 0.9}
    assert verdict_p_adjusted({**result, "verdict": "supported"}) == 0.004
    assert verdict_p_adjusted({**result, "verdict": "inconclusive"}) == 0.004
    # A contradiction rests on the other side's test.
    assert (
        verdict_p_adjusted(
            {"p_adjusted": 0.9, "p_adjusted_contradict": 0.01, "verdict": "contradicted"}
        )
        == 0.01
    )
    # Checks and files written before adjustment carry none.
    assert verdict_p_adjusted({"verdict": "pass"}) is None


def test_extra_fields_sit_at_the_top_level_of_the_json() -> None:
    required = {
        name: None
        for name, f in fields_of(ClaimResult).items()
        if f.default is MISSING and f.default_factory is MISSING
    }
    result = ClaimResult(**required, extra={"other_scale": {"metric": "drift_layer/x"}})
    out = result.to_json()
    assert out["other_scale"] == {"metric": "drift_layer/x"}
    assert "extra" not in out
