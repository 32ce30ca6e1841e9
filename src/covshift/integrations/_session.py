"""What the trainer callbacks share, whatever the trainer: one probed training run.

A :class:`ProbeSession` holds a :class:`~covshift.probe.ShiftProbe` on the trainer's
model for the span of one ``train()``/``fit()``, optional gradient ICS, the scalar
summaries waiting for the trainer's loggers, and the covshift store's run row. The
callbacks translate their trainer's events into four calls:

- :meth:`begin` at train start (on rank 0 only does anything: the others pass
  ``enabled=False``), with the global step training starts from;
- :meth:`set_batch` with the first training batch, when the probe batch was not given
  (the records of the start step are taken then, before any update);
- :meth:`step` after every optimizer step, with the trainer's global step;
- :meth:`end` with the run's status (``finished``, ``failed``, ``interrupted``).

It knows nothing of any trainer; the trainers' modules know nothing of the probe's
mechanics. What it reads off the trainer's objects (the first batch, the optimizer
inside its wrapper, sharded parameters) is :mod:`~covshift.integrations._trainer_objects`;
the store's run row is :mod:`~covshift.integrations._store_run`.
"""

from __future__ import annotations

import atexit
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from covshift.integrations._settings import (
    CALLBACK_DEFAULTS,
    PROBE_OPTIONS,
    SET_BY_SESSION,
    SessionSettings,
)
from covshift.integrations._store_run import RunStatus, StoreRun, _json_safe
from covshift.integrations._trainer_objects import (
    first_examples,
    sharded_parameters,
    unwrap_optimizer,
)
from covshift.probe.batch import ProbeBatch
from covshift.probe.forward import model_device
from covshift.probe.gradient_ics import gradient_ics
from covshift.probe.probe import ShiftProbe
from covshift.probe.record import ProbeRecord
from covshift.probe.scalars import RecordScalars
from covshift.probe.schedule import Schedule
from covshift.probe.select import LayerSpec, select_layers
from covshift.probe.settings import Unpack, resolve
from covshift.store import Store

__all__ = ["ProbeSession"]


class ProbeSession:
    """One probed training run of a trainer (see the module docstring).

    Args:
        layers, record, source, mode, unit_dim: as in :class:`~covshift.probe.ShiftProbe`.
        probe_input: the fixed probe batch, or None to take the first training batch.
        probe_target: the targets of ``probe_input`` (for gradient ICS; optional).
        probe_size: examples kept of the first training batch (None: all of them).
        every / steps / schedule: when to record, in optimizer steps.
        quantiles, bins, unit_histograms, pooled_quantiles, saturation_slope,
            background: as in ``ShiftProbe`` (``background`` False by default here).
        grad_ics: also measure gradient ICS on the probe batch.
        grad_ics_every: its schedule (None: the probe's).
        grad_ics_layers: its layers (None: every module owning a weight matrix).
        grad_ics_loss: ``loss(model(probe batch), probe_target)`` -> scalar loss.
        store: a :class:`~covshift.store.Store`, or the path of one (opened at train
            start and closed at train end), or None.
        run_name: the name of the store's run row.
        log_shift: also give the loggers each layer's shift against its first record.
        prefix: put before the names of the logged scalars.
        caller: the name an unexpected keyword's TypeError gives (the callback's).

    The keywords after ``probe_input`` are declared once, in :class:`SessionSettings`.
    """

    def __init__(
        self,
        *,
        layers: LayerSpec | Sequence[LayerSpec] = "auto",
        probe_input: Any = None,
        caller: str = "ProbeSession.__init__",
        **settings: Unpack[SessionSettings],
    ) -> None:
        taken = sorted(SET_BY_SESSION & settings.keys())
        if taken:
            raise TypeError(f"the callback sets {taken} of ShiftProbe itself; drop them")
        given = resolve(settings, SessionSettings, CALLBACK_DEFAULTS, caller)
        source, probe_size, grad_ics = given["source"], given["probe_size"], given["grad_ics"]
        if source not in ("probe", "train"):
            raise ValueError(f"source must be 'probe' or 'train', got {source!r}")
        if probe_size is not None and (
            not isinstance(probe_size, int) or isinstance(probe_size, bool) or probe_size < 2
        ):
            raise ValueError(f"probe_size must be a whole number >= 2 or None, got {probe_size!r}")
        if source == "train" and probe_input is not None and not grad_ics:
            raise ValueError(
                "probe_input is not used with source='train' (the training batches are "
                "recorded); drop it, or use source='probe'"
            )
        every, steps, schedule = given["every"], given["steps"], given["schedule"]
        grad_ics_every = given["grad_ics_every"]
        log_shift, prefix = given["log_shift"], given["prefix"]
        self.schedule = Schedule.resolve(every, steps, schedule)
        self.grad_schedule = (
            Schedule.resolve(grad_ics_every, None, None) if grad_ics_every else self.schedule
        )
        self.layers = layers
        self.record = given["record"]
        self.source = source
        self.mode = given["mode"]
        self.unit_dim = given["unit_dim"]
        self.probe_size = probe_size
        # ShiftProbe's settings beyond those above, as given (background always).
        self.probe_options = {k: v for k, v in settings.items() if k in PROBE_OPTIONS}
        self.probe_options["background"] = given["background"]
        self.grad_ics = grad_ics
        self.grad_ics_layers = given["grad_ics_layers"]
        self.grad_ics_loss = given["grad_ics_loss"]
        self._given = None if probe_input is None else ProbeBatch.of(probe_input)
        self._given_target = given["probe_target"]
        self._run = StoreRun(given["store"])
        self.run_name = given["run_name"]
        self.prefix = prefix
        self.log_shift = log_shift
        # Per run:
        self.model: nn.Module | None = None
        self.probe: ShiftProbe | None = None
        self.records: list[ProbeRecord] = []
        self.active = False
        self._batch: ProbeBatch | None = None
        self._target: Any = None
        self._start_step = 0
        self._optimizer: Any = None
        self._last: int | None = None
        self._waited = False  # optimizer steps went by while the first batch was awaited
        self._pending: dict[int, dict[str, float]] = {}
        self._scalars = RecordScalars(shift=log_shift, prefix=prefix, skip=("count",))

    @property
    def store(self) -> Store | None:
        """The open store of the run (None without one)."""
        return self._run.store

    @property
    def run_id(self) -> int | None:
        """The run's row in the store (None without a store)."""
        return self._run.run_id

    # -- what the run row records about the probe ----------------------------
    def describe(self) -> dict[str, Any]:
        return _json_safe(
            {
                "layers": self.layers,
                "schedule": repr(self.schedule),
                "record": self.record,
                "source": self.source,
                "mode": self.mode,
                "unit_dim": self.unit_dim,
                "probe_input": "given" if self._given is not None else "first training batch",
                "probe_size": self.probe_size,
                "grad_ics": self.grad_ics,
                "grad_ics_schedule": repr(self.grad_schedule) if self.grad_ics else None,
                "options": self.probe_options,
            }
        )

    @property
    def needs_batch(self) -> bool:
        """Whether the run waits for the first training batch to become the probe batch."""
        return self.active and self._batch is None and (self.source == "probe" or self.grad_ics)

    # -- the trainer's events ------------------------------------------------
    def begin(
        self,
        model: nn.Module,
        *,
        step: int,
        enabled: bool = True,
        optimizer: Any = None,
        config: Mapping[str, Any] | None = None,
        seed: int | None = None,
        default_name: str = "trainer",
    ) -> None:
        """Train start: attach to ``model`` (rank 0: ``enabled``), open the store's run
        and, when the probe batch is known, take the records of ``step``."""
        if self.active:  # the previous train() raised before its end event
            self.end("failed", "a new training run began before this one ended")
        self.model = model
        self.records = []
        self._pending = {}
        self._scalars = RecordScalars(shift=self.log_shift, prefix=self.prefix, skip=("count",))
        self._start_step = int(step)
        self._optimizer = optimizer
        self._last = None
        self._waited = False
        self._batch = self._given
        self._target = self._given_target
        self.probe = None
        if not enabled:
            return
        sharded = sharded_parameters(model)
        if sharded is not None:
            raise NotImplementedError(
                f"the model's parameters are sharded across ranks ({sharded}): a probe "
                "forward on rank 0 alone would wait for the other ranks' shards. Probe it "
                "under DDP (or one process), or gather the model first"
            )
        select_layers(model, self.layers)  # a pattern that matches nothing fails now
        if self.grad_ics and self.grad_ics_loss is None:
            raise ValueError("gradient ICS needs a loss: pass grad_ics_loss=")
        self._open_store(model, config or {}, seed, default_name)
        self.active = True
        atexit.register(self._at_exit)
        if self.source == "train":
            self.probe = self._make_probe(None)
        if not self.needs_batch:
            self._start()

    def set_batch(self, inputs: Any, targets: Any = None) -> None:
        """The first training batch (model inputs, targets), when it is to be the probe
        batch: kept (cut to ``probe_size``) and the start step's records are taken."""
        if not self.needs_batch:
            return
        self._batch, self._target = first_examples(inputs, targets, self.probe_size)
        self._start()

    def step(self, step: int, optimizer: Any = None) -> None:
        """After an optimizer step: the records due at the trainer's global ``step``."""
        if not self.active or step == self._last:
            return
        if self.needs_batch:  # no training forward of the model has been seen yet
            self._waited = True
            return
        self._last = step
        if optimizer is not None:
            self._optimizer = optimizer
        # Gradient ICS first: it runs training-mode forwards of a deep copy of the model,
        # and a copy made while live-batch hooks are armed would carry them along.
        if self.grad_ics and self.grad_schedule.due(step):
            self._measure_grad_ics(step)
        if self.probe is not None:
            self.probe.maybe_record(step)

    def log_metrics(self, step: int, values: Mapping[str, Any]) -> None:
        """The trainer's own scalars (loss, learning rate, ...) into the store's run."""
        if self.active:
            self._run.log_scalars(step, values)

    def take_scalars(self) -> list[tuple[int, dict[str, float]]]:
        """The scalar summaries of the records made since the last call, by step."""
        pending, self._pending = self._pending, {}
        return sorted(pending.items())

    def end(self, status: RunStatus, error: str | None = None) -> None:
        """Train end (or failure): finish or drop the record in progress, remove every
        hook, close the store's run with ``status``."""
        if not self.active:
            return
        self.active = False
        atexit.unregister(self._at_exit)
        failure: BaseException | None = None
        try:
            self._warn_if_never_captured()
            if self.probe is not None:
                self.probe.close(flush=status == "finished")
        except Exception as e:  # a record that cannot be finished makes the run failed
            failure = e
            status, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            self.probe = None
            self._run.finish(status, error)
        if failure is not None:
            raise failure

    # -- internals ------------------------------------------------------------
    def _make_probe(self, batch: ProbeBatch | None) -> ShiftProbe:
        assert self.model is not None
        return ShiftProbe(
            self.model,
            self.layers,
            batch,
            schedule=self.schedule,
            record=self.record,
            source=self.source,
            mode=self.mode,
            unit_dim=self.unit_dim,
            reduce=False,  # rank 0 alone records: no collective may be waited for
            sink=self._sink,
            **self.probe_options,
        )

    def _start(self) -> None:
        if self.source == "probe":
            self.probe = self._make_probe(self._batch)
        self.step(self._start_step)

    def _sink(self, record: ProbeRecord) -> None:
        self.records.append(record)
        self._run.log_record(record)
        self._pending.setdefault(record.step, {}).update(self._scalars(record))

    def _measure_grad_ics(self, step: int) -> None:
        assert self.model is not None and self._batch is not None
        optimizer = unwrap_optimizer(self._optimizer)
        if optimizer is None:
            raise RuntimeError(
                "gradient ICS needs the trainer's torch optimizer, and the trainer gave "
                f"{type(self._optimizer).__name__}"
            )
        device = model_device(self.model, torch.device("cpu"))
        target = self._target
        if isinstance(target, torch.Tensor):
            target = target.to(device)
        assert self.grad_ics_loss is not None
        found = gradient_ics(
            self.model,
            optimizer,
            self._batch.to(device),
            target,
            loss_fn=self.grad_ics_loss,
            layers=self.grad_ics_layers,
        )
        for layer, ics in found.items():
            self._sink(ProbeRecord(step, layer, ics.stats()))

    def _open_store(
        self, model: nn.Module, config: Mapping[str, Any], seed: int | None, default_name: str
    ) -> None:
        self._run.open(
            self.run_name or default_name,
            {**config, "probe": self.describe()},
            seed,
            model_device(model, torch.device("cpu")),
        )

    def _warn_if_never_captured(self) -> None:
        """Training went by and the probe saw none of it: the trainer never called the
        probed module itself (a training step that calls a submodule directly)."""
        name = type(self.model).__name__
        if self._waited and self._batch is None:
            message = (
                f"no training forward of the probed module ({name}) was seen, so no "
                "probe batch was taken from training and nothing was recorded: pass "
                "probe_input=, or probe the submodule the training step calls"
            )
        elif (
            self.source == "train"
            and self._last is not None
            and self._last > self._start_step
            and not any("mean" in r.stats for r in self.records)
        ):
            message = (
                f"ShiftProbe(source='train') saw no training forward of the probed module "
                f"({name}): the trainer's step must call it (a module whose training step "
                "calls a submodule directly: probe that submodule)"
            )
        else:
            return
        warnings.warn(message, stacklevel=3)

    def _at_exit(self) -> None:
        """The process ends with the run open: training raised and nobody caught it
        (or the trainer has no event for failures). Best effort: mark the run."""
        last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        status: RunStatus = "interrupted" if isinstance(last, KeyboardInterrupt) else "failed"
        error = "the process ended before the trainer's train-end event"
        if last is not None:
            error = f"{type(last).__name__}: {last}"
        try:
            self.end(status, error)
        except Exception:
            pass
