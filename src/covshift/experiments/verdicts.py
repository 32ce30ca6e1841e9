"""From per-seed statistics to verdicts: one claim, then its family.

:func:`judge` turns the per-seed outcomes of one claim (one slice) into a
:class:`~covshift.experiments.claim_result.ClaimResult` with its estimate, interval,
p-values and censoring (:mod:`covshift.experiments.significance`) and the unadjusted
verdict. :func:`judge_family` then adjusts the hypotheses' p-values over the family
(a preset's hypotheses in its own report, the whole battery's on the battery page:
Holm, with Benjamini-Hochberg beside it), decides their verdicts on the adjusted
values, passes or fails the checks, and marks hypotheses whose checks failed "not
interpretable". :func:`combine_slices` says, for a claim judged at several values of
an axis, whether the slices agree.

A Spearman trend judged against 0 (no association) gets an exact-in-distribution
permutation test instead of the t test: under no association every ordering of a
seed's values along the axis is equally likely, so the null distribution of the mean
over seeds of the per-seed rank correlations is drawn by permuting each seed's values
independently (20,000 draws from a fixed random state, ``p = (1 + #{null >= observed})
/ (1 + draws)``). It stays valid where every seed gives the same correlation (+1 on
every seed has no spread for a t test). A statistic at the limit of its range (a rank
correlation of +1 or -1 on every seed) has an interval of zero width, and is marked
censored at that limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from covshift.experiments.claim_result import Censoring, ClaimResult
from covshift.experiments.claim_statistics import SeedOutcome
from covshift.experiments.significance import (
    ALPHA,
    Bounds,
    benjamini_hochberg,
    bounded_interval,
    holm,
    rule_p_values,
)

__all__ = [
    "PERMUTATION_DRAWS",
    "combine_slices",
    "decide_unadjusted",
    "judge",
    "judge_family",
    "spearman_permutation_p",
]

PERMUTATION_DRAWS = 20_000


def spearman_permutation_p(
    ranks: Sequence[tuple[np.ndarray, np.ndarray]], observed: float, above: bool
) -> float:
    """p of the mean over seeds of per-seed Spearman correlations being this far
    above (``above``) or below 0 under no association (module docstring)."""
    rng = np.random.default_rng(20180)
    null = np.zeros(PERMUTATION_DRAWS)
    for xs, ys in ranks:
        rx = scipy_stats.rankdata(xs)
        rx = rx - rx.mean()
        shuffled = rng.permuted(np.tile(scipy_stats.rankdata(ys), (PERMUTATION_DRAWS, 1)), axis=1)
        shuffled -= shuffled.mean(axis=1, keepdims=True)
        null += (shuffled @ rx) / (np.linalg.norm(rx) * np.linalg.norm(shuffled, axis=1))
    null /= len(ranks)
    tol = 1e-12  # ties with the observed value count as at least as extreme
    hits = np.sum(null >= observed - tol) if above else np.sum(null <= observed + tol)
    return float((1 + hits) / (1 + PERMUTATION_DRAWS))


def _censoring(
    seeds: Sequence[Bounds], interval: tuple[float, float] | None, stat: Any
) -> Censoring:
    count = sum(s.censored_low or s.censored_high for s in seeds)
    if interval is not None and count:
        low, high = interval[0] == -math.inf, interval[1] == math.inf
        side = "both" if low and high else "below" if low else "above" if high else None
        note = {
            "above": "known only as a lower bound (at least the estimate)",
            "below": "known only as an upper bound (at most the estimate)",
            "both": "open on both sides: no bound at all",
            None: "some seeds censored; the interval includes them as bounds",
        }[side]
        return Censoring(True, side, count, note)
    if stat.method == "spearman" and interval is not None and interval[0] == interval[1]:
        if abs(interval[0]) == 1.0:
            side = "above" if interval[0] > 0 else "below"
            return Censoring(
                True,
                side,
                len(seeds),
                f"a rank correlation of {interval[0]:+g} on every seed: at the limit of its range",
            )
    return Censoring()


def _decide(p_support: float | None, p_contradict: float | None) -> str:
    if p_support is not None and p_support < ALPHA:
        return "supported"
    if p_contradict is not None and p_contradict < ALPHA:
        return "contradicted"
    return "inconclusive"


def judge(result: ClaimResult, outcomes: dict[str, SeedOutcome], stat: Any) -> ClaimResult:
    """Fill ``result`` from per-seed ``outcomes`` (``stat``: the claim's spec)."""
    valued = {s: o for s, o in outcomes.items() if o.bounds is not None}
    seeds = [o.bounds for o in valued.values() if o.bounds is not None]
    result.data = {s: o.data for s, o in outcomes.items()}
    # A seed known within no bound at all (a threshold neither network reached) has no
    # value: its placeholder must not enter the estimate or read as a measurement.
    unbounded = {s for s, o in valued.items() if o.bounds.censored_low and o.bounds.censored_high}
    result.per_seed = {
        s: None if s in unbounded else o.bounds.value
        for s, o in valued.items()
        if o.bounds is not None
    }
    result.per_seed_bounds = {
        s: [o.bounds.lo, o.bounds.hi] for s, o in valued.items() if o.bounds is not None
    }
    result.seeds = len(seeds)
    units = sum(o.units for o in outcomes.values())
    if units:
        result.excluded_units = sum(o.excluded for o in outcomes.values())
        result.units = units
    unmeasurable = {s: o.reason for s, o in outcomes.items() if o.reason}
    if unmeasurable:
        result.measurable = False
        result.measurable_reason = "; ".join(
            f"seed {s}: {why}" for s, why in sorted(unmeasurable.items())
        )
        result.verdict = result.verdict_unadjusted = "not measurable"
        result.reason = result.measurable_reason
        return result
    if not seeds:
        result.verdict = result.verdict_unadjusted = "not measured"
        return result
    mean = float(np.mean([s.value for s in seeds]))
    result.estimate = None if unbounded else mean
    interval = bounded_interval(seeds)
    result.interval = list(interval) if interval is not None else None
    result.censored = _censoring(seeds, interval, stat)
    if interval is None:
        result.verdict = result.verdict_unadjusted = "inconclusive"
        result.reason = "one seed: no interval"
        return result
    ranks = [r for o in valued.values() for r in (o.ranks or [])]
    if (
        stat.method == "spearman"
        and stat.rule in ("greater", "less")
        and stat.value == 0.0
        and (len(ranks) == len(seeds))
    ):
        up = spearman_permutation_p(ranks, mean, True)
        down = spearman_permutation_p(ranks, mean, False)
        result.p_value, result.p_contradict = (up, down) if stat.rule == "greater" else (down, up)
        result.extra["p_method"] = f"permutation ({PERMUTATION_DRAWS:,} draws)"
    else:
        # A check's identical values are its expected, exact outcome (frozen layers
        # drift exactly 0); a hypothesis's are n seeds on one side: a sign test.
        result.p_value, result.p_contradict = rule_p_values(
            stat.rule, stat.value, stat.margin, seeds, exact=stat.kind == "check"
        )
        result.extra["p_method"] = "one-sided Student t on the per-seed bounds"
    return decide_unadjusted(result)


def decide_unadjusted(result: ClaimResult) -> ClaimResult:
    """The verdict of ``result``'s own p-values (before the family's adjustment); a
    hypothesis whose interval has zero width and is not censored gets no verdict."""
    outcome = _decide(result.p_value, result.p_contradict)
    interval = result.interval
    degenerate = interval is not None and interval[0] == interval[1]
    # A hypothesis needs spread to be judged; a check may be exact by construction
    # (frozen layers: exactly zero drift on every seed).
    hypothesis = result.kind == "hypothesis"
    if outcome != "inconclusive" and degenerate and hypothesis and not result.censored.censored:
        assert interval is not None
        outcome = "inconclusive"
        result.reason = (
            f"every seed gives exactly {interval[0]:.4g}: a statistic without spread, "
            "no interval to judge"
        )
    result.verdict = result.verdict_unadjusted = outcome
    if not result.reason:
        result.reason = _reason(result, adjusted=False)
    return result


def _reset(result: ClaimResult) -> None:
    """Back to the unadjusted verdict, so that a family can be judged again (a preset's
    results, then the battery's)."""
    saved = result.extra.setdefault("reason_unadjusted", result.reason)
    result.verdict, result.reason = result.verdict_unadjusted, saved
    result.extra.pop("verdict_if_interpretable", None)


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def _other_scale_note(result: ClaimResult) -> str:
    """Where a drift hypothesis was judged in both scales
    (:mod:`covshift.experiments.scale_check`): what the other one reads."""
    other = result.extra.get("other_scale")
    if not other or "p_own_scale" not in result.extra:
        return ""
    lo, hi = other["interval"] or (math.nan, math.nan)
    estimate = other["estimate"]
    shown = "-" if estimate is None else f"{estimate:+.4g}"
    own = result.extra["verdict_own_scale"]
    return (
        f"; each p is the larger of two scales': in {other['metric']} {shown} "
        f"[{lo:.4g}, {hi:.4g}] ({other['verdict']}), in its own {own}"
    )


def _reason(result: ClaimResult, adjusted: bool) -> str:
    lo, hi = result.interval or (math.nan, math.nan)
    where = f"95% interval [{lo:.4g}, {hi:.4g}]"
    scales = _other_scale_note(result)
    if adjusted:
        return (
            f"{where}; p = {_fmt_p(result.p_value)} for the claim, {_fmt_p(result.p_contradict)}"
            f" against it{scales}; {result.adjust_method}-adjusted over {result.family_size} "
            f"hypotheses: {_fmt_p(result.p_adjusted)} and {_fmt_p(result.p_adjusted_contradict)}"
            f" (level {ALPHA} one-sided)"
        )
    return (
        f"{where}; p = {_fmt_p(result.p_value)} for the claim, "
        f"{_fmt_p(result.p_contradict)} against it{scales}"
    )


def judge_family(results: Sequence[ClaimResult], groups: Sequence[str] | None = None) -> None:
    """Adjust the hypotheses of ``results`` over the family, decide their verdicts,
    pass or fail the checks and mark what a failed check makes uninterpretable.
    ``groups`` names each result's preset (checks guard within their preset);
    None: all one preset."""
    groups = list(groups) if groups is not None else [""] * len(results)
    for r in results:
        _reset(r)
    hypotheses = [r for r in results if r.kind == "hypothesis"]
    support = holm([r.p_value for r in hypotheses])
    against = holm([r.p_contradict for r in hypotheses])
    bh = benjamini_hochberg([r.p_value for r in hypotheses])
    family = sum(r.p_value is not None for r in hypotheses)
    for r, ps, pc, pb in zip(hypotheses, support, against, bh, strict=True):
        r.p_adjusted, r.p_adjusted_contradict, r.p_adjusted_bh = ps, pc, pb
        r.adjust_method, r.family_size = "holm", family
        if r.p_value is not None and r.verdict_unadjusted not in ("not measurable", "not measured"):
            decided = _decide(ps, pc)
            if r.verdict_unadjusted == "inconclusive" and decided != "inconclusive":
                decided = "inconclusive"  # the zero-spread rule above still holds
            r.verdict = decided
            if r.reason == _reason(r, adjusted=False):
                r.reason = _reason(r, adjusted=True)
    for r in results:
        if r.kind == "check":
            r.verdict = {"supported": "pass", "not measured": "not measured"}.get(
                r.verdict_unadjusted, "fail"
            )
            if r.verdict == "fail" and r.verdict_unadjusted == "inconclusive":
                r.reason = f"not shown: {r.reason}"
    failed = [(g, r) for g, r in zip(groups, results, strict=True) if r.kind == "check"]
    failed = [(g, r) for g, r in failed if r.verdict != "pass"]
    for g, r in zip(groups, results, strict=True):
        if r.kind != "hypothesis":
            continue
        blocking = [c for cg, c in failed if _guards(c, cg, r, g)]
        if blocking and r.verdict not in ("not measured", "not measurable"):
            names = ", ".join(f"{c.id} ({c.verdict})" for c in blocking)
            r.extra["verdict_if_interpretable"] = r.verdict
            r.verdict = "not interpretable"
            otherwise = r.extra["verdict_if_interpretable"]
            r.reason = f"the check {names} did not pass; verdict otherwise: {otherwise}"


def _guards(check: ClaimResult, check_group: str, hypothesis: ClaimResult, group: str) -> bool:
    """Whether ``check`` (of preset ``check_group``) guards ``hypothesis`` (of ``group``):
    a ``preset`` check guards its preset's hypotheses, a ``controls`` check those that
    name it (``<id>`` in its preset, ``<preset>:<id>`` from another); and only at the
    slice it was judged on (a check at lr 0.01 guards the hypotheses at lr 0.01)."""
    named = check.id in hypothesis.controls and check_group == group
    named = named or f"{check_group}:{check.id}" in hypothesis.controls
    if not (named or (check.guards == "preset" and check_group == group)):
        return False
    return all(hypothesis.slice.get(k, v) == v for k, v in check.slice.items())


_JUDGED = ("supported", "contradicted", "inconclusive")


def combine_slices(results: Sequence[ClaimResult]) -> list[dict[str, Any]]:
    """For each hypothesis judged on several slices: do the slices agree?
    ``supported at every ...``, ``contradicted at every ...``, ``depends on ...``
    (some supported and some contradicted, or some supported and others not), or
    ``not established at any ...``, over the slices that could be judged; the slices
    that could not (not interpretable, not measurable, not measured) are named after
    it, so that "every" never hides them."""
    by: dict[tuple[str, str], list[ClaimResult]] = {}
    for r in results:
        if r.kind == "hypothesis" and r.slice and r.experiment != "battery":
            by.setdefault((r.experiment, r.id), []).append(r)
    out = []
    for (experiment, claim_id), group in by.items():
        if len(group) < 2:
            continue
        axes = sorted({k for r in group for k in r.slice})
        every = " and ".join(axes)
        every_slice = list(group)
        unjudged = [r for r in group if r.verdict not in _JUDGED]
        group = [r for r in group if r.verdict in _JUDGED]
        verdicts = [r.verdict for r in group]

        def at(name: str, group: list[ClaimResult] = group) -> str:
            return ", ".join(r.slice_text for r in group if r.verdict == name)

        if not verdicts:
            combined = f"judged at no {every}"
        elif all(v == "supported" for v in verdicts):
            combined = f"supported at every {every}" + (" judged" if unjudged else "")
        elif all(v == "contradicted" for v in verdicts):
            combined = f"contradicted at every {every}" + (" judged" if unjudged else "")
        elif "supported" in verdicts and "contradicted" in verdicts:
            combined = (
                f"depends on {every}: supported at {at('supported')}, "
                f"contradicted at {at('contradicted')}"
            )
            if "inconclusive" in verdicts:
                combined += f", inconclusive at {at('inconclusive')}"
        elif "supported" in verdicts or "contradicted" in verdicts:
            shown = "supported" if "supported" in verdicts else "contradicted"
            combined = (
                f"depends on {every}: {shown} at {at(shown)} only, "
                f"inconclusive at {at('inconclusive')}"
            )
        else:
            combined = f"not established at any {every}"
        for name in dict.fromkeys(r.verdict for r in unjudged):
            where = ", ".join(r.slice_text for r in unjudged if r.verdict == name)
            combined += f"; {name} at {where}"
        out.append(
            {
                "experiment": experiment,
                "id": claim_id,
                "axes": axes,
                "slices": [{"slice": r.slice_text, "verdict": r.verdict} for r in every_slice],
                "combined": combined,
            }
        )
    return out
