"""Train one grid point: the same code whichever backend runs it.

:func:`train_point` builds the point's network, probe and divergence guard, trains it
with the one training loop, and sends everything it records to a :class:`PointSink`:
the store itself (:class:`StoreSink`, in-process and pool workers) or a buffer whose
contents travel back to the driver (Ray tasks). Because the backends differ only in
the sink and the checkpointer, the same point gives the same numbers on all of them
(with the same number of torch threads: the thread count changes the last bits of a
float reduction, so a run records its own and keeps it when resumed).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from covshift.callbacks import StoreRecorder
from covshift.checkpoints import Checkpointer
from covshift.data import Dataset, is_text
from covshift.experiments.config import ConfigError, ModelSpec
from covshift.experiments.grid import PointSpec
from covshift.experiments.metric_paths import FLOOR, TRAIN_MODE
from covshift.experiments.point_data import (
    dataset_arguments,
    dataset_for,
    preload_datasets,
    shared_datasets,
)
from covshift.losses import loss_function
from covshift.models import build_cnn, build_deep_linear, build_mlp, build_transformer, build_vgg
from covshift.probe import GradientICSMonitor, ProbeRecord, ShiftProbe, SmoothnessMonitor
from covshift.probe.batch_fluctuation import BatchStatsMonitor
from covshift.probe.layer_gradients import GradientNormMonitor
from covshift.probe.select import glob_match
from covshift.store import StoreError
from covshift.training import (
    DivergenceGuard,
    TrainConfig,
    TrainState,
    train,
)

__all__ = [
    "PointOutcome",
    "PointSink",
    "StoreSink",
    "build_model",
    "dataset_arguments",
    "dataset_for",
    "error_text",
    "preload_datasets",
    "shared_datasets",
    "train_config",
    "train_point",
]


class PointSink(Protocol):
    """Where a training point's records go."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def probe(self, record: ProbeRecord) -> None: ...
    def end(self, status: str, error: str | None = None, diverged_at: int | None = None) -> None:
        """The run ended: ``finished``, ``diverged``, ``interrupted`` or ``failed``."""
        ...


class StoreSink(StoreRecorder):
    """Writes a run's records into the store as they come: the one store path
    (:class:`~covshift.callbacks.StoreRecorder`) under :class:`PointSink`'s names."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.log_scalars(step, values)

    def probe(self, record: ProbeRecord) -> None:
        self.probe_sink(record)

    def end(self, status: str, error: str | None = None, diverged_at: int | None = None) -> None:
        self.finish(status, error, diverged_at)


@dataclass(frozen=True)
class PointOutcome:
    """How a point ended, as a backend reports it to the sweep's driver."""

    point: str
    status: str  # finished | diverged | interrupted | failed | done | busy
    run_id: int | None = None
    final_step: int = 0
    diverged_at: int | None = None
    seconds: float = 0.0
    test_accuracy: float | None = None
    error: str | None = None


def error_text(e: BaseException) -> str:
    """One line for the store's error column: the exception's type and message."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def build_model(spec: ModelSpec, data: Dataset, seed: int) -> torch.nn.Module:
    """The network a :class:`ModelSpec` describes, sized for ``data``, with the
    parameters of its ``freeze`` patterns set not to train."""
    model = _build(spec, data, seed)
    for pattern in spec.freeze:
        frozen = [
            p
            for name, module in model.named_modules()
            if glob_match(name, pattern)
            for p in module.parameters(recurse=True)
        ]
        if not frozen:
            names = [
                n
                for n, m in model.named_modules()
                if n and next(m.parameters(False), None) is not None
            ]
            raise ConfigError(
                f"model.freeze: {pattern!r} matches no module with parameters; "
                f"modules with parameters: {', '.join(names)}"
            )
        for param in frozen:
            param.requires_grad_(False)
    return model


def _build(spec: ModelSpec, data: Dataset, seed: int) -> torch.nn.Module:
    if spec.kind == "transformer" or is_text(data):
        return _build_transformer(spec, data, seed)
    if spec.kind == "linear":
        return build_deep_linear(
            data.num_features,
            data.num_classes,
            depth=spec.depth,
            width=spec.width,
            norm=spec.norm,
            init=spec.init,
            init_std=spec.init_std,
            norm_kwargs=dict(spec.norm_kwargs),
            seed=seed,
        )
    common: dict[str, Any] = dict(
        activation=spec.activation,
        norm=spec.norm,
        norm_position=spec.norm_position,
        init=spec.init,
        init_std=spec.init_std,
        norm_kwargs=dict(spec.norm_kwargs),
        seed=seed,
    )
    if spec.kind == "mlp":
        return build_mlp(
            data.num_features, data.num_classes, width=spec.width, depth=spec.depth, **common
        )
    if data.image_shape is None:
        raise ConfigError(
            f"model.kind = {spec.kind!r} needs image data; dataset {data.name!r} has "
            f"flat features of size {data.num_features}"
        )
    if spec.kind == "vgg":
        return build_vgg(
            data.image_shape,
            data.num_classes,
            width=spec.width,
            depth=spec.depth,
            convs_per_stage=spec.convs_per_stage,
            **common,
        )
    return build_cnn(
        data.image_shape, data.num_classes, channels=spec.channels, pool=spec.pool, **common
    )


def _build_transformer(spec: ModelSpec, data: Dataset, seed: int) -> torch.nn.Module:
    if spec.kind != "transformer" or not is_text(data):
        raise ConfigError(
            f"model.kind = {spec.kind!r} and dataset {data.name!r} do not go together: a "
            "transformer trains on a text dataset, and a text dataset needs a transformer"
        )
    if data.num_features != spec.context:
        raise ConfigError(
            f"dataset {data.name!r} has windows of {data.num_features} bytes, and "
            f"model.context is {spec.context}; load it with context={spec.context}"
        )
    return build_transformer(
        data.num_classes,
        spec.context,
        d_model=spec.width,
        n_layer=spec.depth,
        n_head=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        norm=spec.norm,
        placement=spec.norm_position,  # type: ignore[arg-type]
        init=spec.init,  # type: ignore[arg-type]
        norm_kwargs=dict(spec.norm_kwargs),
        seed=seed,
    )


class _Recorder:
    """Evaluations to the sink; the end status (finished / diverged / interrupted)."""

    def __init__(self, sink: PointSink) -> None:
        self.sink = sink

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.sink.scalars(state.step, metrics)

    def on_train_end(self, state: TrainState, status: str) -> None:
        if status != "failed":  # a failure is closed by train_point, with its error
            self.sink.end(status, diverged_at=state.outcome_step if status == "diverged" else None)


def _renamed(sink: PointSink, suffix: str) -> Any:
    def deliver(record: ProbeRecord) -> None:
        sink.probe(replace(record, layer=record.layer + suffix))

    return deliver


def point_measures(
    spec: PointSpec,
    model: torch.nn.Module,
    data: Dataset,
    sink: PointSink,
    background: bool | None = False,
) -> list[object]:
    """The measurement callbacks of a point, as its :class:`ProbeSpec` asks: the probe
    (eval mode, train mode, or both), the noise-floor probe, gradient ICS, landscape
    smoothness, per-layer gradient norms and BatchNorm's batch-statistics
    fluctuation, all recording into ``sink``."""
    p = spec.probe
    batch = data.x_test[: p.examples]
    common: dict[str, Any] = dict(record=p.record, quantiles=p.quantiles)
    out: list[object] = []
    if p.mode in ("eval", "both"):
        out.append(
            ShiftProbe(
                model,
                p.layers,
                batch,
                every=p.every,
                sink=sink.probe,
                background=background,
                **common,
            )
        )
    if p.mode in ("train", "both"):
        suffix = TRAIN_MODE if p.mode == "both" else ""
        out.append(
            ShiftProbe(
                model,
                p.layers,
                batch,
                every=p.every,
                mode="train",
                sink=_renamed(sink, suffix) if suffix else sink.probe,
                background=False,
                **common,
            )
        )
    if p.noise_floor:
        # The next `examples` test examples, at the first and last probe steps.
        second = data.x_test[p.examples : 2 * p.examples]
        if len(second) < p.examples:
            raise ConfigError(
                f"probe.noise_floor needs 2 x probe.examples = {2 * p.examples} test "
                f"examples; {data.name!r} has {len(data.x_test)}"
            )
        last = (spec.steps // p.every) * p.every
        out.append(
            ShiftProbe(
                model,
                p.layers,
                second,
                steps=sorted({0, last}),
                mode="train" if p.mode == "train" else "eval",
                sink=_renamed(sink, FLOOR),
                background=False,
                **common,
            )
        )
    # What every gradient measure shares: the loss, its batches and where records go.
    measured = {"batch_size": p.measure_batch, "seed": spec.seed, "sink": sink.probe}
    loss = loss_function(data)
    if p.gradient_ics_every:
        out.append(GradientICSMonitor(every=p.gradient_ics_every, loss_fn=loss, **measured))
    if p.smoothness_every:
        out.append(
            SmoothnessMonitor(
                every=p.smoothness_every, step_range=p.smoothness_range, loss_fn=loss, **measured
            )
        )
    if p.gradient_norm_steps:
        out.append(GradientNormMonitor(steps=p.gradient_norm_steps, loss_fn=loss, **measured))
    if p.batch_stats_every:
        out.append(
            BatchStatsMonitor(every=p.batch_stats_every, batches=p.batch_stats_batches, **measured)
        )
    return out


def train_config(spec: PointSpec) -> TrainConfig:
    """The training settings of a point: its schedule and its optimizer's."""
    return TrainConfig(
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.optimizer.lr,
        momentum=spec.optimizer.momentum,
        weight_decay=spec.optimizer.weight_decay,
        eval_every=spec.eval_every,
        seed=spec.seed,
        optimizer=spec.optimizer.kind,
        betas=spec.optimizer.betas,
        warmup_steps=spec.optimizer.warmup_steps,
        lr_decay=spec.optimizer.decay,
    )


def train_point(
    spec: PointSpec,
    data: Dataset,
    sink: PointSink,
    *,
    checkpoint: Checkpointer | None = None,
    background: bool | None = False,
    callbacks: tuple[object, ...] = (),
) -> PointOutcome:
    """Train one point, recording into ``sink``; returns how it ended.

    A point that fails (an exception in training) is closed as ``failed`` with the
    error and reported, not raised; Ctrl-C (``KeyboardInterrupt``) closes it as
    ``interrupted`` and propagates. A :class:`~covshift.store.StoreError` (the store or
    a checkpoint file cannot be written or read: a full disk, an I/O error, a damaged
    store) propagates without closing the run, which the caller does if the store
    can still take it.

    Args:
        spec: the resolved point.
        data: its dataset, on the device the point trains on.
        sink: where the records go.
        checkpoint: where the resumable state lives; an existing state is resumed.
        background: the probe's background records (see :class:`ShiftProbe`); False
            in pool workers and Ray tasks, whose neighbours hold the other cores.
        callbacks: more training-loop callbacks (progress, stop requests).
    """
    start = time.perf_counter()
    data = data.first_test(spec.test_examples)
    try:
        model = build_model(spec.model, data, spec.seed)
        measures = point_measures(spec, model, data, sink, background)
        guard = DivergenceGuard(spec.divergence.factor, spec.divergence.stop)
        config = train_config(spec)
        with contextlib.ExitStack() as stack:
            for measure in measures:
                if isinstance(measure, ShiftProbe):
                    stack.enter_context(measure)
            # Layers that draw from the global generator (noisy BN, dropout) draw the
            # same numbers for a point whichever process runs it, and after whatever
            # ran before it: the generator starts from the point's seed (and a
            # resumed run from the state its checkpoint saved).
            devices = [data.x_train.device.index or 0] if data.x_train.is_cuda else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(spec.seed)
            result = train(
                model,
                data,
                config,
                callbacks=[*measures, guard, _Recorder(sink), *callbacks],
                device=data.x_train.device,
                checkpoint=checkpoint,
            )
    except (KeyboardInterrupt, StoreError):
        # Ctrl-C, or a file that cannot be written or read (a full disk, the store
        # damaged): not this point's failure; the caller closes the run, if it can.
        raise
    except Exception as e:
        # The whole traceback goes to the store (a bug is found from it); the outcome
        # carries its first line for the terminal.
        sink.end("failed", f"{error_text(e)}\n{traceback.format_exc()[-4000:]}")
        return PointOutcome(
            spec.identity(), "failed", seconds=time.perf_counter() - start, error=error_text(e)
        )
    final = result.final.get("test_accuracy")
    return PointOutcome(
        spec.identity(),
        result.status,
        final_step=result.steps,
        diverged_at=result.outcome_step,
        seconds=time.perf_counter() - start,
        test_accuracy=None if final is None or not np.isfinite(final) else float(final),
    )
