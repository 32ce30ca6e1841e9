"""One layer's record: every statistic of its values, computed on their device.

:func:`summarize` turns the values a hook saw into a dict of small tensors (per unit
and pooled over units); :func:`to_host` moves the summaries of all layers of a record
to the host in ONE transfer (a single synchronization on CUDA) and gives them their
final numpy dtypes. Nothing else of the values survives the hook.

Keys of a record (``U`` units, ``Q`` quantile levels, ``B`` bins):

================== ========= ==========================================================
key                shape     meaning
================== ========= ==========================================================
count              ()        values per unit ``M`` (examples x positions)
mean, std          (U,)      per-unit mean and biased std (float64 accumulation)
pooled_mean/std    ()        the same over all units' values together
quantiles          (Q, U)    per-unit quantiles at ``quantile_levels``
pooled_quantiles   (Q,)      quantiles of all units' values (``pooled_quantiles=True``)
quantile_levels    (Q,)      the levels
hist               (B,)      counts of all units' values in ``hist_edges`` (pooled)
hist_edges         (B + 1,)  equal-width edges from the minimum to the maximum value
unit_hist          (U, B)    per-unit counts in the same edges (``unit_histograms=True``)
saturation         (U,)      fraction of saturated inputs of the following activation
pooled_saturation  ()        the same over all units
nonfinite_units    ()        units with at least one non-finite value (inf or NaN)
================== ========= ==========================================================

Non-finite values (a diverging network's inf and NaN) are counted, never averaged
into a number: a unit with one has NaN for its mean, std, quantiles and saturation,
and a zero row in ``unit_hist``; the pooled statistics of a record with such a unit
are NaN; ``hist`` counts the values of the other units, in edges spanning theirs
(all NaN when no unit is finite). ``nonfinite_units`` says how many units that was.
Finite values too large for float32 squares (past ~1.8e19) are summed in float64, so
their std is the finite number it is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from covshift.probe import distributed as dist_ops
from covshift.probe.saturation import saturated
from covshift.probe.stats import (
    Moments,
    histogram_edges,
    quantiles_of_sorted,
    row_quantiles,
    sort_rows,
    sorted_histogram,
    sorted_saturated,
    unit_rows,
    unit_view,
)

__all__ = ["StatsConfig", "saturation_stats", "summarize", "to_host"]

# Final dtypes on the host; anything not listed is float32.
_HOST_DTYPES = {
    "count": np.int64,
    "nonfinite_units": np.int64,
    "hist": np.int64,
    "unit_hist": np.int64,
    "hist_edges": np.float64,
    "quantile_levels": np.float64,
}


@dataclass(frozen=True)
class StatsConfig:
    """What to compute per layer and record.

    Attributes:
        quantiles: quantile levels in [0, 1], increasing (may be empty).
        bins: histogram bins (0: no histogram).
        unit_histograms: also keep one histogram per unit (``U x B`` counts per record).
        saturation_slope: slope fraction that defines a saturated sigmoid/tanh input.
        unit_dim: axis of the units when :func:`summarize` is not given one (1:
            channels; -1: last axis, e.g. token features). The probe finds the axis
            per layer (:mod:`covshift.probe.units`) and passes it.
        pooled_quantiles: also the quantiles of all units' values together (a sort of
            the whole layer: the costliest statistic, off by default).
    """

    quantiles: tuple[float, ...] = (0.15, 0.5, 0.85)
    bins: int = 40
    unit_histograms: bool = False
    saturation_slope: float = 0.05
    unit_dim: int = 1
    pooled_quantiles: bool = False


def _as_float(values: torch.Tensor) -> torch.Tensor:
    # Half-precision values are summarized in float32 (as torch's norms compute stats).
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def summarize(
    value: torch.Tensor,
    config: StatsConfig,
    group: dist_ops.Group | bool = False,
    activation: str | None = None,
    unit_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of one layer's detached value (any shape ``(N, ...)``).

    Args:
        value: the layer's input or output.
        config: what to compute.
        group: a process group (``None`` = the default group) to compute the statistics
            of the values of every rank together (:mod:`covshift.probe.distributed`);
            ``False`` keeps them local.
        activation: the kind of activation the values enter (``"sigmoid"``, ``"tanh"``,
            ``"relu"``), for the saturation figures; None for none.
        unit_dim: the axis of the units (None: ``config.unit_dim``).

    One sort per unit serves the quantiles, the histogram (binary searches of the bin
    edges in the sorted values) and the saturation counts.
    """
    # One contiguous float copy: rows, their float64 chunks and the sort all stream.
    dim = config.unit_dim if unit_dim is None else unit_dim
    rows = _as_float(unit_rows(value, dim)).contiguous()  # (U, M)
    reduce = group is not False
    grp = None if group is False or group is True else group
    moments = Moments.of_rows(rows)
    if reduce:
        moments = dist_ops.gather_moments(moments, grp)
    # A float64 sum of values is non-finite exactly when one of them is (float32 values
    # cannot overflow it), so the unit's mean tells, with no pass over the values.
    bad = ~torch.isfinite(moments.mean)  # (U,)
    any_bad = bad.any()  # 0-d: torch.where below takes it without a synchronization
    pooled = moments.pooled()
    out: dict[str, torch.Tensor] = {
        "count": moments.count,
        "mean": _unmeasured(moments.mean, bad),
        "std": _unmeasured(moments.std, bad),
        "pooled_mean": _unmeasured(pooled.mean[0], any_bad),
        "pooled_std": _unmeasured(pooled.std[0], any_bad),
        "nonfinite_units": bad.sum(),
    }
    if not (config.quantiles or config.bins):
        if activation is not None:
            out.update(saturation_stats(value, activation, config, group, dim))
        return out
    if reduce:  # order statistics need the values of every rank
        rows = dist_ops.gather_rows(rows.t(), grp).t().contiguous()
    ordered = sort_rows(rows)  # (U, M)
    if config.quantiles:
        out["quantiles"] = _unmeasured(row_quantiles(ordered, config.quantiles), bad)
        if config.pooled_quantiles:
            flat = sort_rows(ordered.reshape(1, -1))[0]
            pooled_q = quantiles_of_sorted(flat, config.quantiles)
            out["pooled_quantiles"] = _unmeasured(pooled_q, any_bad)
        out["quantile_levels"] = _levels(config.quantiles, rows.device)
    if config.bins:
        # Edges over the finite units' values (their rows' ends, sorted): a row with
        # an inf or NaN would stretch them to infinity.
        inf = torch.full((), math.inf, dtype=ordered.dtype, device=ordered.device)
        lo = torch.where(bad, inf, ordered[:, 0]).min()
        hi = torch.where(bad, -inf, ordered[:, -1]).max()
        edges = histogram_edges(lo, hi, config.bins, ordered.dtype)
        edges = torch.where(lo <= hi, edges, torch.nan)  # no finite unit: no edges
        counts = sorted_histogram(ordered, edges) * (~bad)[:, None]  # (U, B)
        out["hist_edges"] = edges.double()
        out["hist"] = counts.sum(dim=0)
        if config.unit_histograms:
            out["unit_hist"] = counts
    if activation is not None:
        per_unit = sorted_saturated(ordered, activation, config.saturation_slope)
        per_unit = _unmeasured(per_unit / ordered.shape[1], bad)
        out["saturation"] = per_unit
        out["pooled_saturation"] = per_unit.mean()  # NaN when a unit's is
    return out


def _unmeasured(stat: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``stat`` with NaN where ``bad`` (broadcast along the last axis: units): the
    statistics of values of which some are not finite are not measured."""
    return torch.where(bad, torch.nan, stat)


@functools.lru_cache(maxsize=64)
def _levels(levels: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.float64, device=device)


def saturation_stats(
    value: torch.Tensor,
    kind: str,
    config: StatsConfig,
    group: dist_ops.Group | bool = False,
    unit_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Fraction of ``value``'s entries where an activation of ``kind`` is saturated
    (see :mod:`covshift.probe.saturation`), per unit and pooled; units along
    ``unit_dim`` (None: ``config.unit_dim``)."""
    dim = config.unit_dim if unit_dim is None else unit_dim
    values = _as_float(unit_view(value, dim))
    units = values.shape[1]
    counts = torch.cat(
        [
            saturated(values, kind, config.saturation_slope),
            (~torch.isfinite(values)).sum(dim=0, dtype=torch.float64),
            # torch.full, not new_tensor: no host-to-device copy on CUDA.
            torch.full((1,), float(values.shape[0]), dtype=torch.float64, device=values.device),
        ]
    )  # (2U + 1,): saturated counts, non-finite counts, then M
    if group is not False:
        counts = dist_ops.all_sum(counts, None if group is True else group)
    # A unit with a non-finite value has no saturation (NaN is not saturated, nor not).
    per_unit = _unmeasured(counts[:units] / counts[-1], counts[units:-1] > 0)
    return {"saturation": per_unit, "pooled_saturation": per_unit.mean()}


def to_host(
    summaries: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, dict[str, np.ndarray]]:
    """All layers' summaries as numpy arrays, with one device-to-host transfer.

    Everything is packed into one float64 buffer (integer counts are exact in float64
    below 2**53), copied once, and split again.
    """
    layout: list[tuple[str, str, torch.Size]] = []
    parts: list[torch.Tensor] = []
    for layer, stats in summaries.items():
        for key, t in stats.items():
            layout.append((layer, key, t.shape))
            parts.append(t.detach().reshape(-1))
    if not parts:
        return {}
    # cat promotes to the widest dtype; the float64 part makes it float64 everywhere.
    parts.append(torch.zeros(1, dtype=torch.float64, device=parts[0].device))
    flat = torch.cat(parts).cpu().numpy()
    out: dict[str, dict[str, np.ndarray]] = {layer: {} for layer in summaries}
    offset = 0
    for layer, key, shape in layout:
        size = math.prod(shape)
        chunk = flat[offset : offset + size].reshape(tuple(shape))
        out[layer][key] = chunk.astype(_HOST_DTYPES.get(key, np.float32))
        offset += size
    return out
