"""How a claim is written in a preset: its statistic over the sweep and its verdict rule.

A claim names a statistic computed once per seed from the grid's points, and a rule
that turns the statistic's 95% interval over seeds into a verdict. Both are in the
preset, written before the run; the report quotes them.

Statistics (per seed ``s``; ``m(net, point)`` is a metric path, :mod:`.metrics`):

- ``difference``: ``m_a(network, s) - m_b(baseline, s)``, paired by seed (the two
  networks share initial weights and batches); ``baseline_metric`` compares two
  metrics of one network (e.g. drift against its noise floor), and
  ``baseline_where`` compares two values of a sweep axis (``where = {"model.norm" =
  "batch"}, baseline_where = {"model.norm" = "none"}``).
  With both a ``baseline`` network and ``baseline_where`` and ``interaction = true``,
  the difference of differences ``[m(net) - m(base)]_where - [m(net) - m(base)]
  _baseline_where`` (e.g. BN's gain in a deep network minus its gain in a shallow one).
- ``value``: ``m(network, s)`` itself (e.g. a drift that must be zero).
- ``trend``: over the values ``v`` of one sweep ``axis``, the Spearman rank correlation
  of ``m(network, v, s)`` with ``v`` (``method = "spearman"``), the least-squares
  slope against ``v`` or ``log2 v`` (``method = "slope"``, ``log_axis``), or the range
  ``max_v m - min_v m`` (``method = "range"``: how much the metric moves along the
  axis in any pattern, which a slope misses when it jumps up and down); with a
  ``baseline``, of the paired difference ``m(network, v, s) - m(baseline, v, s)``.
- ``layer_trend``: the same along the probed layers of one network, in forward order
  (layer index 0, 1, ...), of a per-layer metric written with ``*`` for the layer
  (``drift/*``, ``drift/*@train``); for gradient norms, along the weight layers whose
  names match a pattern, in numeric order (``grad_norm/0/blocks.*.mlp.c_fc``: the
  MLP's first weight of every block, at initialization).
- ``threshold``: the largest (``pick = "largest"``) or smallest axis value at which
  the network's metric reaches ``target`` (``>=``; ``<=`` with ``below = true``) and
  the run did not diverge; with a ``baseline``, the difference of the two networks'
  thresholds (of ``log2`` thresholds with ``log_axis``).

``where`` fixes sweep axes to one value; a claim is judged separately on every
combination of the axes it neither fixes nor runs along (one verdict per slice). A
value ``"largest"`` or ``"smallest"`` names that end of a numeric axis, resolved when
the configuration is read, so that one claim serves sizes that sweep other values.

Rules, on the interval ``[lo, hi]`` against ``value`` (and ``margin`` m >= 0):

============ ============================== ===============================
rule         supported when                 contradicted when
============ ============================== ===============================
greater      lo > value                     hi < value
less         hi < value                     lo > value
not_less     lo >= value - m                hi < value - m
not_greater  hi <= value + m                lo > value + m
within       value - m <= lo, hi <= value+m hi < value - m or lo > value + m
============ ============================== ===============================

anything else is ``inconclusive`` (and so is a claim measured on one seed). The
interval, the p-values that decide the verdict and their correction over the family
of hypotheses are in :mod:`covshift.experiments.significance`.

Each claim is a ``kind``:

- ``hypothesis`` (the default): a claim of the textbook or a paper, judged with the
  other hypotheses of its family (p-values adjusted for multiple comparisons);
- ``check``: a control of the instrument or of the setup, not a finding: a negative
  control (frozen layers give exactly zero drift) or a positive control (a setup in
  which the effect is known to appear shows it). A check passes or fails on its own
  unadjusted interval; it is never counted among supported claims. A failed check
  makes the hypotheses it ``guards`` "not interpretable": every hypothesis of the
  preset (``guards = "preset"``, the default) or only those that name it in their
  ``controls`` (``guards = "controls"``).

``margin_reason`` says in one sentence why the rule's margin is what it is (the
smallest effect that matters), and is quoted beside the rule.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, model_validator

from covshift.experiments.metric_paths import parse_metric

__all__ = ["RULES", "ClaimSpec", "rule_text"]

RULES = ("greater", "less", "not_less", "not_greater", "within")

# covshift 0.1 claims: {metric, better, than, direction} compared one run per network.
_LEGACY_DIRECTIONS = {
    "higher": "greater",
    "lower": "less",
    "not_lower": "not_less",
    "not_higher": "not_greater",
}


class ClaimSpec(BaseModel):
    """One claim of a preset (see the module docstring for the statistics and rules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    id: str | None = None
    kind: Literal["hypothesis", "check"] = "hypothesis"
    # hypothesis: the checks (positive controls) its verdict needs; check: what it guards
    controls: tuple[str, ...] = ()
    guards: Literal["preset", "controls"] = "preset"
    reading: str = ""  # the operational reading of the claim, quoted in the report
    statistic: Literal["difference", "value", "trend", "layer_trend", "threshold"] = "difference"
    metric: str
    network: str
    baseline: str | None = None
    baseline_metric: str | None = None
    where: dict[str, Any] = Field(default_factory=dict)
    baseline_where: dict[str, Any] = Field(default_factory=dict)
    # Set when the configuration is read: "where.<axis>" -> "largest" / "smallest" for
    # each axis end it resolved, so that the pre-registration hash sees the claim as
    # written, the same at every size (covshift.experiments.preregistration).
    axis_ends: dict[str, Literal["largest", "smallest"]] = Field(default_factory=dict)
    interaction: StrictBool = False
    axis: str | None = None
    method: Literal["spearman", "slope", "range"] = "spearman"
    log_axis: StrictBool = False
    target: StrictFloat | None = None
    below: StrictBool = False
    pick: Literal["largest", "smallest"] = "largest"
    rule: Literal["greater", "less", "not_less", "not_greater", "within"]
    value: StrictFloat = 0.0
    margin: StrictFloat = Field(0.0, ge=0)
    margin_reason: str = ""

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "direction" in data:
            data = dict(data)
            direction = data.pop("direction")
            if direction not in _LEGACY_DIRECTIONS:
                raise ValueError(
                    f"direction {direction!r}: use one of {', '.join(_LEGACY_DIRECTIONS)} "
                    f"(or the rule field: {', '.join(RULES)})"
                )
            data.setdefault("rule", _LEGACY_DIRECTIONS[direction])
            if "better" in data:
                data.setdefault("network", data.pop("better"))
            if "than" in data:
                data.setdefault("baseline", data.pop("than"))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ClaimSpec:
        if self.kind == "check" and self.controls:
            raise ValueError(
                "controls belong to hypotheses (the checks their verdict needs); a check "
                'says what it guards with guards = "preset" or "controls"'
            )
        if self.kind == "hypothesis" and self.guards != "preset":
            raise ValueError('guards belongs to checks (kind = "check")')
        for path in (self.metric, self.baseline_metric):
            if path is not None:
                parse_metric(path.replace("/*", "/last"))
        if self.statistic == "layer_trend":
            if "*" not in self.metric:
                raise ValueError(
                    "a layer_trend claim runs along the probed layers: write its metric with "
                    "* for the layer (drift/*), or a pattern of weight layers for a gradient "
                    "norm (grad_norm/0/blocks.*.mlp.c_fc)"
                )
            if self.axis is not None or self.baseline is not None:
                raise ValueError("a layer_trend claim is about one network and no sweep axis")
            return self
        if self.statistic == "value":
            if self.baseline is not None or self.baseline_metric is not None or self.axis:
                raise ValueError("a value claim is one network's metric: drop baseline and axis")
            if self.baseline_where:
                raise ValueError("baseline_where belongs to difference claims")
            return self
        if self.interaction and (self.baseline is None or not self.baseline_where):
            raise ValueError(
                "interaction = true compares a difference between networks (baseline) at "
                "two values of an axis (baseline_where): give both"
            )
        if self.statistic == "difference":
            if self.baseline is None and self.baseline_metric is None and not self.baseline_where:
                raise ValueError(
                    "a difference needs a baseline network, a baseline_metric or a "
                    "baseline_where to compare with"
                )
            missing = [k for k in self.baseline_where if k not in self.where]
            if missing:
                raise ValueError(
                    f"baseline_where sets {', '.join(missing)}: fix the compared side of "
                    f'each in where too (where = {{ "{missing[0]}" = ... }})'
                )
            if self.axis is not None or self.target is not None:
                raise ValueError("axis and target belong to trend and threshold claims")
        else:
            if self.axis is None:
                raise ValueError(f"a {self.statistic} claim needs the sweep axis it runs along")
            if self.axis in self.where:
                raise ValueError(f"axis {self.axis!r} cannot also be fixed by where")
        if self.statistic != "difference" and self.baseline_where:
            raise ValueError("baseline_where belongs to difference claims")
        if self.statistic == "threshold" and self.target is None:
            raise ValueError("a threshold claim needs a target value of its metric")
        return self

    @property
    def networks(self) -> tuple[str, ...]:
        return (self.network,) + ((self.baseline,) if self.baseline else ())


def rule_text(claim: ClaimSpec) -> str:
    """The verdict rule in words, as the report quotes it."""
    v, m = f"{claim.value:g}", claim.margin
    lo, hi = f"{claim.value - m:g}", f"{claim.value + m:g}"
    supported, contradicted = {
        "greater": (f"lies above {v}", f"lies below {v}"),
        "less": (f"lies below {v}", f"lies above {v}"),
        "not_less": (f"lies at or above {lo}", f"lies below {lo}"),
        "not_greater": (f"lies at or below {hi}", f"lies above {hi}"),
        "within": (f"lies inside [{lo}, {hi}]", f"lies outside [{lo}, {hi}]"),
    }[claim.rule]
    return (
        f"supported if the 95% interval of the statistic over seeds {supported}; "
        f"contradicted if it {contradicted}; inconclusive otherwise (and on one seed)"
    )
