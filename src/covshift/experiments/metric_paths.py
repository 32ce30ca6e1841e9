"""Metric paths: the names of a point's headline numbers, as claims and tables cite them.

A metric path is ``/``-separated:

- ``<series>/<when>``: a scalar series recorded at evaluations (``test_accuracy``,
  ``test_loss``, ``train_loss``; for text also ``test_bpb``, ``train_bpb``, the
  losses in bits per byte) at step ``<when>`` (an integer), at the ``final``
  (last) evaluation, or its ``max`` / ``min`` over the run;
- ``drift/<layer>``: the quantile drift of a probed layer between its first and last
  records (:func:`covshift.probe.shift_metrics.unit_quantile_drift`, averaged over units);
- ``drift_layer/<layer>``: the same displacement in units of the layer's typical
  outer-quantile width at the first record (one scale for the whole layer, so a single
  unit whose spread shrinks cannot blow it up), over the same usable units;
- ``fluct/<layer>``: its fluctuation, the same drift between consecutive records,
  averaged over the pairs of consecutive records (what moves from record to record,
  which the first-to-last displacement ignores); ``fluct_layer/<layer>`` in units of
  the layer's typical width at the first record, as ``drift_layer``;
- ``steps_to/<series>/<target>``: the first evaluation step at which the series
  reaches ``target`` (``>=``; for a ``*_loss`` or ``*_bpb`` series, ``<=``); missing
  when it never does;
- ``reach/<series>/<target>``: ``steps_to``, censored: a run that never reaches the
  target (or diverges first) counts as its planned length plus one evaluation
  interval, a lower bound on its true time (so slow networks are not dropped);
- ``diverged``: 1 when the run diverged, else 0;
- ``floor/<layer>``: the measurement's noise floor, the same drift formula between
  two different probe batches at the same weights (``probe.noise_floor``): mean over
  the first and last probe steps of ``(1/U) sum_u (1/|Q|) sum_q |Q^B_{u,q} - Q^A_{u,q}|
  / w_u`` with the drift's own widths ``w_u``; ``floor_layer/<layer>`` in units of the
  layer's first-record width, the floor of ``drift_layer``;
- ``ics_cos/<layer>``, ``ics_l2/<layer>``, ``ics_rel/<layer>``: gradient ICS
  (Santurkar et al. 2018, Def. 2.1) of a weight layer, ``cos(G, G')``, ``||G - G'||``
  and ``||G - G'|| / ||G||`` (the relative form, which does not grow with the
  gradient's own size; the paper compares the change relative to the gradient),
  averaged over its measurements (``probe.gradient_ics_every``); ``<layer>`` = ``mean``
  averages the layers too;
- ``smooth/<figure>``: a landscape figure (``loss_range``, ``grad_predictiveness``,
  ``beta_smoothness``) averaged over its measurements (``probe.smoothness_every``);
- ``rise/<series>/<fraction>``: the series' value at the final evaluation minus its
  value at the last evaluation at or before ``fraction`` of the planned steps (how much
  it still moved over the last part of the run: a run that has converged rises by
  about nothing);
- ``grad_norm/<step>/<layer>``: the gradient norm ``||dL/dW||_F`` of a weight layer's
  weight matrices at ``<step>`` (``probe.gradient_norm_steps``; step 0 is the
  initialization), on a training batch (Xiong et al. 2020);
- ``batch_stats/<figure>/<layer|mean>``: how much a BatchNorm layer's batch
  statistics fluctuate between training batches at fixed weights
  (``probe.batch_stats_every``; Shen et al. 2020), averaged over its measurements:
  ``design_effect`` (the variance of a batch mean over what independent values would
  give it), ``mean_sd`` (the batch mean's standard deviation in units of the channel's)
  or ``var_cv`` (the batch variance's relative fluctuation); ``mean`` averages the
  BatchNorm layers too (:mod:`covshift.probe.batch_fluctuation`);
- ``log10/<metric path>``: the base-10 logarithm of another metric (missing where it
  is not positive), for quantities that move by orders of magnitude (a regression
  loss: ``log10/test_loss/final`` minus ``log10/test_loss/0`` is the number of orders
  of magnitude it fell).

A layer may be named ``first`` or ``last``: the first or last probed layer of the
network in forward order (``drift/last`` is the last hidden layer of an MLP of any
depth). ``drift/mean``, ``fluct/mean``, ``floor/mean`` average the figure over every
probed layer, ``drift/mean:<glob>`` over the probed layers whose names match the glob
(``drift/mean:blocks.*.ln_?``); not measurable when any of those layers is not. A
layer's train-mode records (``probe.mode = "both"``) are the layer ``<layer>@train``
(``drift/hidden.2.act@train``).

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

__all__ = [
    "BATCH_FIGURES",
    "FLOOR",
    "ICS_STATS",
    "SERIES",
    "SMOOTHNESS",
    "TRAIN_MODE",
    "MetricPath",
    "parse_metric",
]

# test_bpb / train_bpb: the losses in bits per byte, recorded for text datasets
SERIES = ("test_accuracy", "test_loss", "train_loss", "test_bpb", "train_bpb")
# Suffixes of the probe records stored beside a layer's own (eval-mode) records.
TRAIN_MODE = "@train"  # the probe batch in train mode (batch statistics, noise on)
FLOOR = "@floor"  # a second probe batch at the same weights (the noise floor)
ICS_STATS = {"ics_cos": "grad_ics_cos", "ics_l2": "grad_ics_l2", "ics_rel": "grad_ics_rel"}
SMOOTHNESS = ("loss_range", "grad_predictiveness", "beta_smoothness")
BATCH_FIGURES = ("design_effect", "mean_sd", "var_cv")  # batch_stats/<figure>/<layer>
# the layer-scale heads and the figure each measures in the layer's first-record width
LAYER_SCALE: dict[str, Literal["drift", "fluct", "floor"]] = {
    "drift_layer": "drift",
    "fluct_layer": "fluct",
    "floor_layer": "floor",
}


@dataclass(frozen=True)
class MetricPath:
    """A parsed metric path (see the module docstring)."""

    kind: Literal[
        "series",
        "rise",
        "drift",
        "fluct",
        "steps_to",
        "reach",
        "diverged",
        "floor",
        "ics",
        "smooth",
        "log10",
        "grad_norm",
        "batch_stats",
    ]
    series: str | None = None
    when: int | Literal["final", "max", "min"] | None = None
    layer: str | None = None
    target: float | None = None
    stat: str | None = None  # the stored statistic of an ics / smooth metric
    scale: Literal["unit", "layer"] = "unit"  # a drift's unit of length
    inner: MetricPath | None = None  # the metric a log10 path takes the logarithm of
    fraction: float | None = None  # where a rise starts, as a fraction of the run

    @property
    def lower_is_better(self) -> bool:
        return self.series is not None and self.series.endswith(("_loss", "_bpb"))


def parse_metric(path: str) -> MetricPath:
    """Parse a metric path; ``ValueError`` with what is accepted when it is malformed."""
    accepted = (
        "accepted: <series>/<step|final|max|min>, drift/<layer>, drift_layer/<layer>, "
        "fluct/<layer>, fluct_layer/<layer>, floor/<layer>, floor_layer/<layer>, "
        "ics_cos/<layer|mean>, ics_l2/<layer|mean>, ics_rel/<layer|mean>, smooth/<figure>, "
        "steps_to/<series>/<target>, reach/<series>/<target>, rise/<series>/<fraction>, "
        "grad_norm/<step>/<layer>, batch_stats/<figure>/<layer|mean>, "
        "diverged, log10/<metric>; "
        f"series: {', '.join(SERIES)}; "
        f"figures: {', '.join(SMOOTHNESS)}; batch_stats figures: {', '.join(BATCH_FIGURES)}"
    )
    head, _, rest = path.partition("/")
    if head == "log10":
        if not rest:
            raise ValueError(f"metric {path!r}: log10 needs a metric (log10/test_loss/final)")
        inner = parse_metric(rest)
        if inner.kind == "log10":
            raise ValueError(f"metric {path!r}: one log10 is enough")
        return MetricPath("log10", inner=inner)
    if path == "diverged":
        return MetricPath("diverged")
    if head in ("drift", "floor", "fluct", *LAYER_SCALE):
        if not rest:
            raise ValueError(f"metric {path!r}: {head} needs a layer ({head}/hidden.2.act)")
        if head in LAYER_SCALE:
            return MetricPath(LAYER_SCALE[head], layer=rest, scale="layer")
        return MetricPath(head, layer=rest)  # type: ignore[arg-type]
    if head in ICS_STATS:
        if not rest:
            raise ValueError(f"metric {path!r}: {head} needs a layer, or mean ({head}/mean)")
        return MetricPath("ics", layer=rest, stat=ICS_STATS[head])
    if head == "grad_norm":
        step, _, layer = rest.partition("/")
        if not step.isdigit() or not layer:
            raise ValueError(
                f"metric {path!r}: grad_norm needs a step and a layer "
                "(grad_norm/0/blocks.3.mlp.c_fc)"
            )
        return MetricPath("grad_norm", when=int(step), layer=layer)
    if head == "batch_stats":
        figure, _, layer = rest.partition("/")
        if figure not in BATCH_FIGURES or not layer:
            raise ValueError(
                f"metric {path!r}: batch_stats needs a figure ({', '.join(BATCH_FIGURES)}) "
                "and a layer, or mean (batch_stats/design_effect/mean)"
            )
        return MetricPath("batch_stats", layer=layer, stat=figure)
    if head == "smooth":
        if rest not in SMOOTHNESS:
            raise ValueError(f"metric {path!r}: unknown figure {rest!r}; {accepted}")
        return MetricPath("smooth", stat=rest)
    if head == "rise":
        series, _, fraction = rest.partition("/")
        if series not in SERIES:
            raise ValueError(f"metric {path!r}: unknown series {series!r}; {accepted}")
        try:
            share = float(fraction)
        except ValueError:
            raise ValueError(f"metric {path!r}: fraction {fraction!r} is not a number") from None
        if not 0.0 <= share < 1.0:
            raise ValueError(f"metric {path!r}: the fraction must lie in [0, 1), got {share:g}")
        return MetricPath("rise", series=series, fraction=share)
    if head in ("steps_to", "reach"):
        series, _, target = rest.partition("/")
        if series not in SERIES:
            raise ValueError(f"metric {path!r}: unknown series {series!r}; {accepted}")
        try:
            value = float(target)
        except ValueError:
            raise ValueError(f"metric {path!r}: target {target!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"metric {path!r}: target must be finite")
        return MetricPath(head, series=series, target=value)  # type: ignore[arg-type]
    if head in SERIES:
        if rest in ("final", "max", "min"):
            return MetricPath("series", series=head, when=rest)  # type: ignore[arg-type]
        if rest.isdigit():
            return MetricPath("series", series=head, when=int(rest))
        raise ValueError(f"metric {path!r}: {rest!r} is not a step, final, max or min")
    raise ValueError(f"metric {path!r}: unknown metric; {accepted}")
