"""A drift hypothesis is decided only where both of the drift's scales agree.

A drift is a displacement divided by a length, and covshift offers two lengths
(docs/metrics.md, "Layer scale"):

- the **unit scale** (``drift/``, ``fluct/``): each unit's own 15-85 width, averaged
  over the records, ``mean_u d_u / w_u``;
- the **layer scale** (``drift_layer/``, ``fluct_layer/``): one length for the layer,
  the median width of its usable units at the first record, ``mean_u d_u / S_0``.

They agree where a layer's units are alike. They part where a few units' widths shrink
towards the collapse floor without crossing it: each such unit divides its own
displacement by a small number, and the unit-scale mean is carried by those few. Found
at full size (10 seeds) in ``shift-causes``: with ``hidden.2`` frozen, 5 of the head's
64 inputs carried 54% of the unit-scale drift (their widths down to 0.008 against a
median of 0.33) while the median unit drifted less than with every block training, so
``cause-layer2`` read contradicted under the unit scale and supported under the layer
scale, whose one length is the same for every network of a seed (they share their
first record).

The rule (2026-12-07; docs/claims.md, "Rule changes"): a hypothesis on a drift or a
fluctuation whose rule is a sign (``greater`` or ``less`` than 0 with no margin, which
means the same in either unit) is judged under both scales as an intersection-union
test: its p-value on each side is the larger of the two scales' p-values (Berger 1982,
Technometrics 24: rejecting only where every component test rejects keeps the level).
It is supported, or contradicted, only where both scales are. The estimate and interval
stay in the claim's own scale; the other scale's are in ``other_scale``. A check of the
same form (a drift above its noise floor, ``exists-*``; noisy BN's fluctuation above
BN's) passes only where it passes in both scales, so that the instrument is shown to
resolve the drift in the scale every hypothesis is also read in; the noise floor has
both scales (``floor/``, ``floor_layer/``). A rule with a value or a margin keeps its
one scale: they are in the claim's unit (a frozen layer's drift within 1e-6 of 0).
"""

from __future__ import annotations

from typing import Any

from covshift.experiments.claim_result import ClaimResult
from covshift.experiments.claim_spec import ClaimSpec
from covshift.experiments.metric_paths import LAYER_SCALE
from covshift.experiments.verdicts import decide_unadjusted

__all__ = ["apply_other_scale", "other_scale_metric", "scale_twin", "scales_disagree"]

# each head to its other scale, both ways, from the metric paths' own pairing
_OTHER_SCALE = {**LAYER_SCALE, **{unit: layer for layer, unit in LAYER_SCALE.items()}}
# what a claim's own metric may be (a floor is only ever a baseline)
_MEASURED = tuple(h for h in _OTHER_SCALE if not h.startswith("floor"))


def other_scale_metric(path: str | None) -> str | None:
    """``path`` with a drift's, fluctuation's or noise floor's scale swapped
    (``drift/head`` -> ``drift_layer/head`` and back); None for any other metric."""
    if not path:
        return None
    head, sep, rest = path.partition("/")
    other = _OTHER_SCALE.get(head)
    return f"{other}{sep}{rest}" if other and rest else None


def scale_twin(claim: ClaimSpec) -> ClaimSpec | None:
    """The same claim (hypothesis or check) read in the other scale, or None where the
    rule does not apply: a rule with a value or a margin (they are in the claim's
    unit: a frozen layer's drift within 1e-6 of 0), or a metric that is not a drift or
    a fluctuation, or a baseline metric that is not one of those or a noise floor."""
    if claim.rule not in ("greater", "less") or claim.value != 0.0 or claim.margin != 0.0:
        return None
    if claim.metric.split("/")[0] not in _MEASURED:
        return None
    metric = other_scale_metric(claim.metric)
    if metric is None:
        return None
    update: dict[str, Any] = {"metric": metric}
    if claim.baseline_metric is not None:
        baseline = other_scale_metric(claim.baseline_metric)
        if baseline is None:
            return None
        update["baseline_metric"] = baseline
    return claim.model_copy(update=update)


def apply_other_scale(result: ClaimResult, twin: ClaimResult) -> ClaimResult:
    """Record ``twin`` (the same claim and slice, judged in the other scale) in
    ``result.other_scale``, make ``result``'s p-values on each side the larger of the
    two and decide it again (the intersection-union test of the module docstring).

    A twin without p-values (not measured, not measurable) gives no evidence: the
    result's p-values become 1 and it is undecided. A combined verdict the twin does
    not reach on its own (its interval has zero width, so its rule gave it none) is
    undecided too. A result without p-values of its own is left as it is."""
    result.extra["other_scale"] = {
        "metric": twin.metric,
        "baseline_metric": twin.baseline_metric,
        "estimate": twin.estimate,
        "interval": twin.interval,
        "p_value": twin.p_value,
        "p_contradict": twin.p_contradict,
        "verdict": twin.verdict_unadjusted,
        "reason": twin.reason,
    }
    if result.p_value is None:
        return result
    result.extra["p_own_scale"] = [result.p_value, result.p_contradict]
    result.extra["verdict_own_scale"] = result.verdict_unadjusted
    result.p_value = _larger(result.p_value, twin.p_value)
    result.p_contradict = _larger(result.p_contradict, twin.p_contradict)
    method = result.extra.get("p_method", "")
    result.extra["p_method"] = (
        f"{method}; the larger of the unit- and layer-scale p-values (intersection-union)"
    )
    result.reason = ""
    decide_unadjusted(result)
    decided = result.verdict_unadjusted
    if decided in ("supported", "contradicted") and twin.verdict_unadjusted != decided:
        result.verdict = result.verdict_unadjusted = "inconclusive"
        result.reason = (
            f"{result.reason}; undecided: the other scale alone is {twin.verdict_unadjusted} "
            f"({twin.reason})"
        )
    return result


def _larger(own: float | None, other: float | None) -> float:
    """The intersection-union p-value of one side: a scale without a p-value gives no
    evidence (1)."""
    return max(1.0 if own is None else own, 1.0 if other is None else other)


def scales_disagree(result: dict[str, Any]) -> bool:
    """Whether a judged result (its JSON object) reads differently in its two scales,
    unadjusted, with at least one of them decided: what the reports mark."""
    other = result.get("other_scale")
    own = result.get("verdict_own_scale")
    if not other or own is None:
        return False
    decided = {"supported", "contradicted"}
    return own != other["verdict"] and bool({own, other["verdict"]} & decided)
