"""Train the points of one batch as the members of one batched model.

:func:`train_point_members` is :func:`covshift.experiments.point.train_point` for a
batch of points that share their network's shape: each point gets the network, probe,
measurements, divergence guard, recorder and checkpoint it would get alone, and
:func:`covshift.batched.trainer.train_members` trains them together. Each point is
recorded into its own sink exactly as :func:`train_point` records it (the same rows,
the same end status, a failure's traceback); a point that fails alone fails alone.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Sequence

import numpy as np

from covshift.batched.member import MemberRun
from covshift.batched.trainer import train_members
from covshift.checkpoints import Checkpointer
from covshift.data import Dataset
from covshift.experiments.grid import PointSpec
from covshift.experiments.point import (
    PointOutcome,
    PointSink,
    _Recorder,
    build_model,
    error_text,
    point_measures,
    train_config,
)
from covshift.probe import ShiftProbe
from covshift.store.errors import StoreError
from covshift.training import DivergenceGuard

__all__ = ["train_point_members"]


def _failed(
    spec: PointSpec, sink: PointSink, error: BaseException, trace: str, start: float
) -> PointOutcome:
    sink.end("failed", f"{error_text(error)}\n{trace[-4000:]}")
    return PointOutcome(
        spec.identity(), "failed", seconds=time.perf_counter() - start, error=error_text(error)
    )


def train_point_members(
    specs: Sequence[PointSpec],
    data: Dataset,
    sinks: Sequence[PointSink],
    *,
    checkpoints: Sequence[Checkpointer | None],
    background: bool | None = False,
    callbacks: Sequence[tuple[object, ...]] = (),
) -> list[PointOutcome]:
    """Train ``specs`` as one batch, each recording into its own sink; one
    :class:`PointOutcome` per spec, in order.

    The specs must share their dataset, steps, batch size, evaluation interval,
    evaluated test examples and device (:func:`covshift.experiments.members.batch_key`).
    Ctrl-C closes every member as ``interrupted`` and propagates.
    """
    start = time.perf_counter()
    data = data.first_test(specs[0].test_examples)
    per_member = list(callbacks) or [()] * len(specs)
    outcomes: list[PointOutcome | None] = [None] * len(specs)
    runs: list[MemberRun] = []
    index: list[int] = []
    for i, spec in enumerate(specs):
        try:
            model = build_model(spec.model, data, spec.seed)
            measures = point_measures(spec, model, data, sinks[i], background)
            guard = DivergenceGuard(spec.divergence.factor, spec.divergence.stop)
            run = MemberRun(
                model,
                train_config(spec),
                [*measures, guard, _Recorder(sinks[i]), *per_member[i]],
                checkpoints[i],
                rng_seed=spec.seed,
                name=spec.identity(),
            )
        except Exception as e:
            outcomes[i] = _failed(spec, sinks[i], e, traceback.format_exc(), start)
            continue
        runs.append(run)
        index.append(i)
    try:
        with contextlib.ExitStack() as stack:
            for run in runs:
                for cb in run.callbacks:
                    if isinstance(cb, ShiftProbe):
                        stack.enter_context(cb)
            done = train_members(runs, data, device=data.x_train.device)
    except (KeyboardInterrupt, StoreError):
        # Ctrl-C, or a file that cannot be written or read: nobody's failure; the
        # caller closes the runs, if it can (as train_point leaves it to its caller).
        raise
    except Exception as e:  # the batched step itself: every member fails with it
        trace = traceback.format_exc()
        for i in index:
            outcomes[i] = _failed(specs[i], sinks[i], e, trace, start)
        return [o for o in outcomes if o is not None]
    seconds = time.perf_counter() - start
    for i, member in zip(index, done, strict=True):
        spec = specs[i]
        if member.result is None:
            error = member.error or RuntimeError("the member ended without a result")
            outcomes[i] = _failed(spec, sinks[i], error, member.trace or "", start)
            continue
        result = member.result
        final = result.final.get("test_accuracy")
        outcomes[i] = PointOutcome(
            spec.identity(),
            result.status,
            final_step=result.steps,
            diverged_at=result.outcome_step,
            seconds=seconds,
            test_accuracy=None if final is None or not np.isfinite(final) else float(final),
        )
    return [o for o in outcomes if o is not None]
