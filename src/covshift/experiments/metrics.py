"""Metric paths: the names of a point's headline numbers, as claims and tables cite them.

A metric path is ``/``-separated:

- ``<series>/<when>``: a scalar series recorded at evaluations (``test_accuracy``,
  ``test_loss``, ``train_loss``) at step ``<when>`` (an integer), at the ``final``
  (last) evaluation, or its ``max`` / ``min`` over the run;
- ``drift/<layer>``: the quantile drift of a probed layer between its first and last
  records (:func:`covshift.probe.metrics.unit_quantile_drift`, averaged over units);
- ``steps_to/<series>/<target>``: the first evaluation step at which the series
  reaches ``target`` (``>=``; for a ``*_loss`` series, ``<=``); missing when it never
  does;
- ``diverged``: 1 when the run diverged, else 0.

A diverged run stops where the divergence rule fired (see
:class:`~covshift.experiments.config.DivergenceSpec`); its series values at later
checkpoints are those of its last evaluation (what a network with non-finite or
exploding weights goes on computing), so "accuracy at step 5,000" of a network that
diverged at step 800 is its accuracy at step 800, and it never reaches a target
afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["SERIES", "MetricPath", "parse_metric"]

SERIES = ("test_accuracy", "test_loss", "train_loss")


@dataclass(frozen=True)
class MetricPath:
    """A parsed metric path (see the module docstring)."""

    kind: Literal["series", "drift", "steps_to", "diverged"]
    series: str | None = None
    when: int | Literal["final", "max", "min"] | None = None
    layer: str | None = None
    target: float | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.series is not None and self.series.endswith("_loss")


def parse_metric(path: str) -> MetricPath:
    """Parse a metric path; ``ValueError`` with what is accepted when it is malformed."""
    accepted = (
        "accepted: <series>/<step|final|max|min>, drift/<layer>, "
        f"steps_to/<series>/<target>, diverged; series: {', '.join(SERIES)}"
    )
    head, _, rest = path.partition("/")
    if path == "diverged":
        return MetricPath("diverged")
    if head == "drift":
        if not rest:
            raise ValueError(f"metric {path!r}: drift needs a layer (drift/hidden.2.act)")
        return MetricPath("drift", layer=rest)
    if head == "steps_to":
        series, _, target = rest.partition("/")
        if series not in SERIES:
            raise ValueError(f"metric {path!r}: unknown series {series!r}; {accepted}")
        try:
            value = float(target)
        except ValueError:
            raise ValueError(f"metric {path!r}: target {target!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"metric {path!r}: target must be finite")
        return MetricPath("steps_to", series=series, target=value)
    if head in SERIES:
        if rest in ("final", "max", "min"):
            return MetricPath("series", series=head, when=rest)  # type: ignore[arg-type]
        if rest.isdigit():
            return MetricPath("series", series=head, when=int(rest))
        raise ValueError(f"metric {path!r}: {rest!r} is not a step, final, max or min")
    raise ValueError(f"metric {path!r}: unknown metric; {accepted}")
