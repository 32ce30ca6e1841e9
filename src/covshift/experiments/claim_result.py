"""One claim's result: what was measured, how it was judged, and why.

:class:`ClaimResult` is built in one place (:func:`covshift.experiments.claims.judge`
for the claims of a preset, and the battery's correlation claim through the same
function) and written as one JSON object per result in ``claims.json`` and
``summary.json``; the report pages and the terminal tables read those objects.

Fields a reader's script can rely on, beyond the claim's own settings:

- ``kind``: ``"hypothesis"`` or ``"check"`` (:mod:`covshift.experiments.claim_spec`);
- ``estimate``, ``interval`` (95%, :mod:`covshift.experiments.significance`),
  ``per_seed`` (the values), ``per_seed_bounds`` (what each seed is known within);
- ``p_value`` (the claim's side), ``p_contradict`` (the other side), ``p_adjusted`` and
  ``p_adjusted_contradict`` with ``adjust_method`` over ``family_size`` hypotheses,
  ``p_adjusted_bh`` (Benjamini-Hochberg, beside); None for checks and where there is
  no interval;
- ``censored``: ``{"censored": bool, "side": "above" | "below" | "both" | None,
  "seeds": n, "note": ...}``: a statistic known only as a bound (a threshold at the
  grid's edge, a time to target never reached, a rank correlation at its limit);
- ``excluded_units``: where drift is involved, the units left out as degenerate
  (collapsed, saturated, dead) summed over the points the claim reads, and ``units``;
- ``measurable`` (false with ``measurable_reason`` where no honest number exists);
- ``other_scale`` (a drift or fluctuation hypothesis judged in both scales,
  :mod:`covshift.experiments.scale_check`): the other scale's ``metric``, ``estimate``,
  ``interval``, ``p_value``, ``p_contradict``, ``verdict`` (unadjusted) and ``reason``;
  with ``p_own_scale`` and ``verdict_own_scale``, the claim's own before the two were
  combined (absent where the other scale had no p-values);
- ``verdict``: for hypotheses ``supported`` / ``contradicted`` / ``inconclusive`` /
  ``not measured`` / ``not measurable`` / ``not interpretable`` (a check it relies on
  failed), decided on the adjusted p-values; ``verdict_unadjusted`` beside it; for
  checks ``pass`` / ``fail`` / ``not measured``; ``reason`` says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Censoring", "ClaimResult"]


@dataclass
class Censoring:
    """Whether (and on which side) a result is only a bound."""

    censored: bool = False
    side: str | None = None  # "above" (at least), "below" (at most), "both"
    seeds: int = 0
    note: str = ""


@dataclass
class ClaimResult:
    """One claim (one slice of its free axes) judged over seeds."""

    id: str
    index: int
    text: str
    reading: str
    experiment: str
    kind: str
    statistic: str
    metric: str
    baseline_metric: str | None
    network: str | None
    baseline: str | None
    axis: str | None
    method: str | None
    target: float | None
    pick: str | None
    below: bool
    log_axis: bool
    where: dict[str, Any]
    baseline_where: dict[str, Any]
    interaction: bool
    slice: dict[str, Any]
    slice_text: str
    rule: str
    value: float
    margin: float
    margin_reason: str
    rule_text: str
    interval_method: str
    controls: list[str] = field(default_factory=list)
    guards: str | None = None
    estimate: float | None = None
    interval: list[float] | None = None
    seeds: int = 0
    seeds_total: int = 0
    per_seed: dict[str, float | None] = field(default_factory=dict)  # None: no bound
    per_seed_bounds: dict[str, list[float]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    p_value: float | None = None
    p_contradict: float | None = None
    p_adjusted: float | None = None
    p_adjusted_contradict: float | None = None
    p_adjusted_bh: float | None = None
    adjust_method: str | None = None
    family_size: int | None = None
    censored: Censoring = field(default_factory=Censoring)
    excluded_units: int | None = None
    units: int | None = None
    measurable: bool = True
    measurable_reason: str | None = None
    verdict: str = "not measured"
    verdict_unadjusted: str = "not measured"
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``claims.json`` (``extra``'s keys at the top level)."""
        out = asdict(self)
        extra = out.pop("extra")
        out.update(extra)
        return out


def verdict_p_adjusted(result: dict[str, Any]) -> float | None:
    """The adjusted p-value behind a result's verdict (its JSON object): the
    contradicting side's (``p_adjusted_contradict``) for a contradicted hypothesis,
    the claim's own (``p_adjusted``) otherwise; None where there is none (checks,
    results without an interval, files written before the battery adjusted)."""
    if result.get("verdict") == "contradicted":
        return result.get("p_adjusted_contradict")
    return result.get("p_adjusted")
