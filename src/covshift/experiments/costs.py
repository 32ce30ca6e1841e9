"""What a sweep will cost: the measured seconds of one architecture
(:class:`Cost`, measured by :func:`covshift.experiments.preflight.preflight`), a point's
seconds from them, and the sweep's wall-clock estimate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from covshift.experiments.grid import Point

__all__ = ["Cost", "estimate_seconds", "format_seconds", "spread_seconds"]


@dataclass(frozen=True)
class Cost:
    """Measured seconds of one architecture: a step, a full evaluation, a record, and
    what a run does besides: building its network and probe (once), drawing each
    epoch's permutation (a text corpus has millions of windows), saving its checkpoint
    (at each evaluation) and each measurement its probe asks for."""

    step: float
    evaluation: float
    record: float
    gradient_ics: float = 0.0  # one gradient-ICS measurement (when the probe asks)
    smoothness: float = 0.0  # one landscape measurement
    gradient_norm: float = 0.0  # one record of every layer's gradient norm
    batch_stats: float = 0.0  # one measurement of BatchNorm's batch statistics
    checkpoint: float = 0.0  # one checkpoint save with its digest
    setup: float = 0.0  # building the network and attaching its probe
    epoch: float = 0.0  # drawing one epoch's permutation of the training set
    epoch_batches: int = 0  # batches in one epoch (0: no epoch is ever drawn again)

    def of(self, point: Point) -> float:
        """Seconds of ``point``'s whole run."""
        spec = point.spec
        p = spec.probe
        evals = spec.steps // spec.eval_every + 2
        records = (spec.steps // p.every + 1) * (2 if p.mode == "both" else 1)
        records += 2 if p.noise_floor else 0
        measured = 0.0
        for every, seconds in (
            (p.gradient_ics_every, self.gradient_ics),
            (p.smoothness_every, self.smoothness),
            (p.batch_stats_every, self.batch_stats),
        ):
            if every:
                measured += (spec.steps // every + 1) * seconds
        measured += sum(1 for s in p.gradient_norm_steps if s <= spec.steps) * self.gradient_norm
        # an epoch is drawn at step 0 and whenever the last one's batches ran out
        epochs = 1 + ((spec.steps - 1) // self.epoch_batches if self.epoch_batches else 0)
        return (
            self.setup
            + epochs * self.epoch
            + spec.steps * self.step
            + evals * (self.evaluation + self.checkpoint)
            + records * self.record
            + measured
        )


def spread_seconds(seconds: Sequence[float], workers: int) -> float:
    """Wall time of jobs of ``seconds`` spread over ``workers``, longest first, each to
    the least loaded worker, plus a few seconds to start the workers' pool."""
    loads = [0.0] * max(1, min(workers, len(seconds)))
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    startup = 3.0 if workers > 1 else 0.0
    return max(loads) + startup if seconds else 0.0


def estimate_seconds(points: Sequence[Point], costs: dict[str, Cost], workers: int) -> float:
    """Wall-clock estimate: the points' costs spread over ``workers``
    (:func:`spread_seconds`)."""
    return spread_seconds([costs[p.id].of(p) for p in points], workers)


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
