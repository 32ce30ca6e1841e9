"""Reducing probe statistics across the processes of a torch.distributed job.

Each rank probes its own shard of the batch; a record must equal the record that one
process would make of the concatenated batch. Per statistic, the cheapest exact
reduction:

- moments: gather ``(n, mean, m2)`` of every rank and merge them (Chan et al. 1979);
  equal to the single-process moments up to float64 rounding;
- saturation counts: summed (one all-reduce);
- quantiles and histograms: order statistics cannot be merged from summaries, so the
  values themselves are gathered (one all-gather of the layer's ``(M, U)`` values per
  record, sorted once for both; ask for no quantiles and ``bins=0`` to avoid it).

Every rank must record the same layers at the same steps, since these are collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from covshift.probe.stats import Moments

__all__ = ["all_sum", "gather_moments", "gather_rows", "world_size"]

Group = dist.ProcessGroup | None


def world_size(group: Group = None) -> int:
    """Processes in ``group`` (the default group when None); 1 outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_moments(m: Moments, group: Group = None) -> Moments:
    """Moments of the union of every rank's values (the same result on every rank)."""
    units = m.mean.shape[0]
    local = torch.cat([m.count.reshape(1), m.mean, m.m2])  # (1 + 2U,)
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(parts, local, group=group)
    table = torch.stack(parts)  # (W, 1 + 2U), rank order: the same merge everywhere
    return Moments.stack_merge(table[:, 0], table[:, 1 : 1 + units], table[:, 1 + units :])


def all_sum(t: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Sum of ``t`` over the ranks (a new tensor)."""
    total = t.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def gather_rows(values: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Rows of every rank's ``(M_r, U)`` values, concatenated in rank order."""
    size = torch.tensor([values.shape[0]], device=values.device)
    sizes = [torch.empty_like(size) for _ in range(world_size(group))]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in torch.cat(sizes).tolist()]  # one small sync per layer
    padded = values.new_zeros((max(counts), *values.shape[1:]))
    padded[: values.shape[0]] = values
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)  # all_gather needs equal shapes
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
