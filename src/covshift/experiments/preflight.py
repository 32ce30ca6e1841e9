"""Everything checked before a sweep writes anything, and what the sweep will cost.

:func:`preflight` loads each dataset of the grid once, builds each distinct network,
attaches its probe and trains it for a few steps on a throwaway copy: a network the
data cannot feed, a norm keyword the layer rejects, a probe pattern that matches
nothing or a claim that cites an unprobed layer fails here, with the grid point and
the field at fault, before the store is created or a run row is written. The same
few steps time one step, one evaluation and one probe record of each distinct
architecture, from which the sweep's runtime is estimated.
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from collections.abc import Sequence

import torch

from covshift.data import BatchSampler, Dataset, DatasetError
from covshift.experiments.config import ConfigError, ExperimentConfig
from covshift.experiments.costs import Cost
from covshift.experiments.grid import Point, PointSpec
from covshift.experiments.metric_paths import TRAIN_MODE, parse_metric
from covshift.experiments.model_size import available_bytes, model_size
from covshift.experiments.point import build_model, dataset_for, point_measures, train_config
from covshift.losses import loss_function
from covshift.probe import GradientICSMonitor, ShiftProbe, SmoothnessMonitor
from covshift.probe.batch_fluctuation import BatchStatsMonitor
from covshift.probe.layer_gradients import GradientNormMonitor
from covshift.probe.select import glob_match
from covshift.train_checkpoint import checkpoint_payload
from covshift.training import TrainState, config_optimizer, evaluate, resolve_device

__all__ = ["preflight"]

# Timed steps: the mean of _TIMED_BLOCKS blocks, not their median: a run's time is the
# sum of its steps, hiccups included (a median of blocks left them out and priced a
# 300-step transformer run 10% short).
_TIMED_BLOCKS = 8
_BLOCK_STEPS = 10
_EVAL_SAMPLE = 1000  # examples evaluated for timing; scaled to the test set


def _architecture(point: Point) -> str:
    """What a step's cost depends on (not the learning rate, init scale or seed)."""
    spec = point.spec
    model = spec.model.model_dump(mode="json", exclude={"init", "init_std"})
    return repr(
        (
            spec.dataset,
            spec.data_dir,
            spec.device,
            spec.batch_size,
            # AdamW's step costs more than SGD's; momentum and weight decay add work
            (spec.optimizer.kind, spec.optimizer.momentum > 0, spec.optimizer.weight_decay > 0),
            sorted(spec.probe.model_dump(mode="json", exclude={"every"}).items()),
            sorted((k, repr(v)) for k, v in model.items()),
        )
    )


def _load(point: Point) -> Dataset:
    """The point's dataset on the CPU, from the process's cache (an in-process sweep
    then trains on the copy loaded here)."""
    try:
        return dataset_for(point.spec, torch.device("cpu"))
    except DatasetError as e:
        raise DatasetError(f"point {point.name}: {e}") from None


def _check_sizes(point: Point, data: Dataset) -> None:
    spec = point.spec
    if spec.batch_size > len(data.x_train):
        raise ConfigError(
            f"batch_size = {spec.batch_size} (point {point.name}) is larger than the "
            f"{len(data.x_train)} training examples of {spec.dataset}"
        )
    if spec.test_examples is not None and spec.test_examples > len(data.x_test):
        raise ConfigError(
            f"test_examples = {spec.test_examples} (point {point.name}) is more than the "
            f"{len(data.x_test)} test examples of {spec.dataset}"
        )
    if spec.probe.examples > len(data.x_test):
        raise ConfigError(
            f"probe.examples = {spec.probe.examples} (point {point.name}) is more than the "
            f"{len(data.x_test)} test examples of {spec.dataset}; use at most {len(data.x_test)}"
        )
    if spec.probe.noise_floor and 2 * spec.probe.examples > len(data.x_test):
        raise ConfigError(
            f"probe.noise_floor (point {point.name}) needs a second probe batch: 2 x "
            f"probe.examples = {2 * spec.probe.examples} test examples, and {spec.dataset} has "
            f"{len(data.x_test)}; use probe.examples <= {len(data.x_test) // 2}"
        )
    measure = spec.probe.measure_batch
    if measure is not None and measure > len(data.x_train):
        raise ConfigError(
            f"probe.measure_batch = {measure} (point {point.name}) is more than the "
            f"{len(data.x_train)} training examples of {spec.dataset}"
        )


# the fields that make a network large, per model.kind
_SIZE_FIELDS = {
    "mlp": ("width", "depth"),
    "linear": ("width", "depth"),
    "cnn": ("channels",),
    "vgg": ("width", "depth", "convs_per_stage"),
    "transformer": ("width", "depth", "context", "mlp_ratio"),
}


def _too_big(point: Point, what: str) -> str:
    model = point.spec.model
    fields = ", ".join(f"model.{f} = {getattr(model, f)}" for f in _SIZE_FIELDS[model.kind])
    return (
        f"point {point.name}: the network is too large for this machine ({what}); "
        f"its size: {fields}, batch_size = {point.spec.batch_size}: make it smaller"
    )


def _allocation_failed(error: RuntimeError) -> bool:
    """Whether torch's error says memory could not be allocated (CPU or CUDA)."""
    text = str(error).lower()
    return any(
        part in text
        for part in ("can't allocate memory", "out of memory", "overflow", "storage size")
    )


def _check_memory(point: Point, data: Dataset) -> None:
    """Refuse a network whose training step cannot fit in the device's free memory."""
    spec = point.spec
    size = model_size(spec.model, data.num_features, data.num_classes, data.image_shape)
    need = size.training_bytes(spec.batch_size)
    free = available_bytes(resolve_device(spec.device))
    if free is not None and need > free:
        raise ConfigError(
            _too_big(
                point,
                f"{size.weights:,} weights and {size.units:,} units per example need at "
                f"least {need / 2**30:,.1f} GiB to train, and the device has "
                f"{free / 2**30:,.1f} GiB free",
            )
        )


def _try(point: Point, data: Dataset, threads: int) -> tuple[Cost, list[str]]:
    """Build, probe and train ``point`` for a few steps; its cost and probed layers."""
    spec = point.spec
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        try:
            model = build_model(spec.model, data, spec.seed)
        except MemoryError:
            raise ConfigError(_too_big(point, "the machine ran out of memory")) from None
        except RuntimeError as e:
            if not _allocation_failed(e):
                raise
            raise ConfigError(_too_big(point, f"allocating its weights failed: {e}")) from None
        except (ValueError, TypeError) as e:
            field = "model.norm_kwargs: " if "takes no keyword" in str(e) else ""
            raise ConfigError(
                f"point {point.name}: the model cannot be built: {field}{e}"
            ) from None
        try:
            probe = ShiftProbe(
                model,
                spec.probe.layers,
                data.x_test[: spec.probe.examples],
                every=1,
                record=spec.probe.record,
                quantiles=spec.probe.quantiles,
                background=False,
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"point {point.name}: probe.layers: {e}") from None
        built = time.perf_counter() - started
        optimizer = config_optimizer(model.parameters(), train_config(spec))
        sampler = BatchSampler(len(data.x_train), spec.batch_size, spec.seed)
        start = time.perf_counter()
        sampler.next()  # draws the first epoch's permutation
        epoch = time.perf_counter() - start
        criterion = loss_function(data)

        def steps(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):  # what the loop does: gather a batch, forward, backward, step
                idx = sampler.next()
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(data.x_train[idx]), data.y_train[idx])
                if loss.requires_grad:  # (every parameter frozen: nothing to step)
                    loss.backward()
                optimizer.step()
            return (time.perf_counter() - start) / n

        with probe:
            try:
                start = time.perf_counter()
                probe.maybe_record(0)  # the first record pays for setting up
                setup = built + time.perf_counter() - start
                start = time.perf_counter()
                probe.record_now(1)
                record = time.perf_counter() - start
                steps(5)  # the first steps pay for allocations (and kernel loading)
                step = statistics.fmean(steps(_BLOCK_STEPS) for _ in range(_TIMED_BLOCKS))
                start = time.perf_counter()
                evaluate(model, data.x_test[:_EVAL_SAMPLE], data.y_test[:_EVAL_SAMPLE])
                evaluation = (
                    (time.perf_counter() - start)
                    * min(len(data.x_test), spec.test_examples or len(data.x_test))
                    / min(_EVAL_SAMPLE, len(data.x_test))
                )
                measured = _measurement_costs(spec, model, optimizer, data, sampler)
            except MemoryError:
                raise ConfigError(_too_big(point, "the machine ran out of memory")) from None
            except RuntimeError as e:
                if _allocation_failed(e):
                    raise ConfigError(_too_big(point, f"a training step failed: {e}")) from None
                raise ConfigError(f"point {point.name}: a training step fails: {e}") from None
            layers = list(probe.layer_names)
    finally:
        torch.set_num_threads(previous)
    cost = Cost(
        step,
        evaluation,
        record,
        setup=setup,
        epoch=epoch,
        epoch_batches=len(data.x_train) // spec.batch_size,
        **measured,
    )
    return cost, layers


class _Discard:
    """A sink for the throwaway run's records."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def probe(self, record: object) -> None:
        pass

    def end(self, status: str, error: str | None = None, diverged_at: int | None = None) -> None:
        pass


# Which Cost field holds one measurement of each monitor a point can run.
_MONITOR_FIELDS: dict[type, str] = {
    GradientICSMonitor: "gradient_ics",
    SmoothnessMonitor: "smoothness",
    GradientNormMonitor: "gradient_norm",
    BatchStatsMonitor: "batch_stats",
}


def _measurement_costs(
    spec: PointSpec,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    sampler: BatchSampler,
) -> dict[str, float]:
    """Seconds of one measurement of each monitor the point runs (the monitors of its
    own run, at their first due step) and of one checkpoint's bytes and digest."""
    state = TrainState(model, optimizer, data, train_config(spec), torch.device("cpu"))
    out: dict[str, float] = {}
    monitors = point_measures(spec, model, data, _Discard(), background=False)
    for monitor in monitors:
        if isinstance(monitor, ShiftProbe):
            continue  # timed apart, as `record`
        field = _MONITOR_FIELDS.get(type(monitor))
        if field is None:  # a new monitor must say what it costs, or estimates lie
            raise TypeError(f"the preflight does not time {type(monitor).__name__}")
        due = monitor.schedule  # type: ignore[attr-defined]
        state.step = min(due.steps) if due.steps else 0
        start = time.perf_counter()
        monitor.on_step_end(state)  # type: ignore[attr-defined]
        out[field] = time.perf_counter() - start
    # A checkpoint's bytes and their digest, in memory: the preflight writes no file
    # (a full disk is the run's to report, with what to do), and fsync is a small part.
    state.step = 0
    payload = checkpoint_payload(state, sampler, {}, monitors)
    start = time.perf_counter()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    hashlib.sha256(buffer.getbuffer()).hexdigest()
    out["checkpoint"] = time.perf_counter() - start
    return out


def preflight(config: ExperimentConfig, points: Sequence[Point], threads: int) -> dict[str, Cost]:
    """Check every distinct network of the grid (see the module docstring).

    Returns the measured cost per point id. Raises :class:`ConfigError` or
    :class:`~covshift.data.DatasetError` naming the point and what is wrong.
    """
    costs: dict[str, Cost] = {}
    measured: dict[str, Cost] = {}
    probed: dict[str, list[str]] = {}
    devices: set[str] = set()
    for point in points:
        if point.spec.device not in devices:
            try:
                resolve_device(point.spec.device)
            except ValueError as e:
                raise ConfigError(f"device (point {point.name}): {e}") from None
            devices.add(point.spec.device)
        data = _load(point)
        _check_sizes(point, data)
        arch = _architecture(point)
        if arch not in measured:
            _check_memory(point, data)
        if arch not in measured:
            measured[arch], layers = _try(point, data, threads)
            probed.setdefault(point.network, layers)
        costs[point.id] = measured[arch]
    _check_claim_layers(config, probed)
    return costs


def _check_claim_layers(config: ExperimentConfig, probed: dict[str, list[str]]) -> None:
    for i, claim in enumerate(config.claims):
        for role, net, path in (
            ("metric", claim.network, claim.metric),
            ("baseline_metric", claim.baseline or claim.network, claim.baseline_metric),
        ):
            if path is None:
                continue
            metric = parse_metric(path)
            layers = probed.get(net) or []
            if metric.kind not in ("drift", "fluct", "floor") or not layers:
                continue
            probe = config.probe
            name = metric.layer or ""
            if probe.mode == "both" and name.endswith(TRAIN_MODE):
                name = name.removesuffix(TRAIN_MODE)
            pattern = name.partition(":")[2] if name.startswith("mean:") else None
            if pattern is None and "*" in name and name != "*":
                pattern = name  # a layer trend along a glob of layers
            if pattern is not None or name == "mean":
                if not any(glob_match(layer, pattern or "**") for layer in layers):
                    raise ConfigError(
                        f"claims[{i}].{role}: {path!r}: no layer that network {net!r} probes "
                        f"matches {pattern!r}; it probes {', '.join(layers)}"
                    )
            elif name not in layers and name not in ("*", "first", "last"):
                raise ConfigError(
                    f"claims[{i}].{role}: {path!r}: network {net!r} probes "
                    f"{', '.join(layers)}, not {metric.layer!r}"
                    + (" (train-mode records need probe.mode = 'both')" if "@" in name else "")
                )
            if metric.kind == "floor" and not probe.noise_floor:
                raise ConfigError(
                    f"claims[{i}].{role}: {path!r} needs the noise floor: set probe.noise_floor"
                )
