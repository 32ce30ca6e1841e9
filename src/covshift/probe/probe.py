"""ShiftProbe: record per-unit statistics of chosen layers, on a schedule.

Mechanics, schedule and statistics are separate (as in fastai's hooks):

- *mechanics* (:mod:`~covshift.probe.hooks`): forward hooks that exist only while a
  record is being taken, so a training step between records pays nothing;
- *schedule* (:class:`~covshift.probe.schedule.Schedule`): which steps record;
- *statistics* (:mod:`~covshift.probe.record_summary`): computed on the detached values
  inside the hook, on their device; a record costs one transfer to the host;
- *units* (:mod:`~covshift.probe.units`): which axis of each layer's values holds its
  units, found per layer (``unit_dim="auto"``) and said in every record;
- *records* (:mod:`~covshift.probe.record`): how the summaries of a forward become
  :class:`~covshift.probe.record.ProbeRecord` s in the sink;
- *the probe forward* (:mod:`~covshift.probe.forward`): the probe batch's forward
  through the model, which leaves its mode, buffers and random state as they were.

This module is the public face that ties them together: its arguments (checked by
:mod:`~covshift.probe.probe_args`), when each record is taken and where (on this
thread, in the background worker, or from the next training forward), and the events
of :mod:`covshift.training`'s loop.

Two sources of values:

- ``source="probe"`` (default): a fixed probe batch is run through the model under
  ``no_grad`` in eval mode (no running-statistic update, no dropout; the mode is
  restored). The same batch at every record separates what the parameters did from
  batch-sampling noise.
- ``source="train"``: the live training batches. When step ``s`` is due, hooks are
  armed and capture the NEXT training-mode forward with gradients on (the forward of
  step ``s + 1``, which runs with the weights after ``s`` updates, like a probe-batch
  record at ``s``); the record is labelled ``s`` and finished at the next
  :meth:`~ShiftProbe.maybe_record`. Evaluation forwards in between are not captured.

Example (your own loop)::

    probe = ShiftProbe(model, "auto", probe_input=x_test[:1000], every=100)
    with probe:                        # hooks are removed on exit, whatever happens
        probe.maybe_record(0)          # step 0: the initialization
        for step in range(1, steps + 1):
            ...                        # your training step
            probe.maybe_record(step)
    probe.records                      # [ProbeRecord(step, layer, stats), ...]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from covshift.probe import distributed as dist_ops
from covshift.probe.background import BackgroundRecorder, has_foreign_hooks
from covshift.probe.batch import ProbeBatch
from covshift.probe.collector import Collector
from covshift.probe.explain import explain_failure as _explain
from covshift.probe.forward import model_device, probe_forward
from covshift.probe.hooks import Taps
from covshift.probe.norm_stats import untrained_norms
from covshift.probe.probe_args import check_modes, check_statistics, probe_batch
from covshift.probe.record import ProbeRecord, RecordDelivery
from covshift.probe.record_summary import StatsConfig, to_host
from covshift.probe.schedule import Schedule
from covshift.probe.select import LayerSpec, select_layers
from covshift.probe.settings import PROBE_DEFAULTS, ProbeSettings, Unpack, resolve
from covshift.probe.units import UnitAxis, UnitPolicy

__all__ = ["ShiftProbe"]


class ShiftProbe:
    """Record the distribution of the inputs (or outputs) of chosen layers.

    Args:
        model: any ``nn.Module``.
        layers: what to watch (see :mod:`covshift.probe.select`): glob patterns over
            module names (``"hidden.*.act"``), module types (``nn.ReLU``), ``"auto"``
            (every norm and activation), ``"auto:linear"`` (every Linear/Conv), or a
            list of these. A pattern or type must match at least one module.
        probe_input: the fixed probe batch, required with ``source="probe"``: a tensor
            ``(N, ...)``, a tuple of positional arguments, a dict of keyword arguments
            (a Hugging Face batch) or ``(args, kwargs)`` (see
            :mod:`covshift.probe.batch`). A batch that does not fit fails at the first
            record (or at :meth:`check`), with the module that rejects it and the
            shape it expects.
        every: record at steps 0, k, 2k, ... (default 100).
        steps: explicit steps to record at, instead of ``every``.
        schedule: a :class:`Schedule` (e.g. ``Schedule.logspace(50_000)``), instead.
        record: ``"input"`` (the first tensor argument of the layer, e.g. the
            pre-activation fed to a sigmoid) or ``"output"`` (its first tensor output).
        source: ``"probe"`` (the fixed probe batch) or ``"train"`` (live batches).
        mode: how the probe batch goes through the model: ``"eval"`` (default; norms
            use their running statistics, or before those have seen a batch the probe
            batch's own, marked ``norm_batch_stats`` in the record: docs/probe.md;
            noise layers are off) or ``"train"`` (norms
            use the probe batch's own statistics and noise layers draw, as a training
            forward would). A train-mode record changes nothing: every buffer (running
            statistics, counters) is restored after it and the global random state
            too, so training goes on bitwise as without it. Train-mode records are
            taken on the training thread (no background).
        quantiles: quantile levels to record per unit and pooled.
        bins: bins of the adaptive-range histogram of each layer (0: none).
        unit_histograms: keep one histogram per unit as well (``U x bins`` per record).
        pooled_quantiles: also record the quantiles of all units' values together (a
            sort of the whole layer per record; off by default for its cost).
        saturation_slope: a sigmoid/tanh input is saturated where the slope is below
            this fraction of the peak slope (see :mod:`covshift.probe.saturation`).
        unit_dim: which axis of each layer's values holds its units (see
            :mod:`covshift.probe.units`). ``"auto"`` (default): found per layer, from the
            layer itself (a norm's ``normalized_shape`` or ``num_features``, a Linear's
            features, a convolution's channels, checked against the tensor's shape), or
            for layers that say nothing (activations, custom modules) from the layer
            that produced their input. An int (1: channels of ``(N, C, H, W)``; -1: the
            last axis, features of ``(N, T, E)``): that axis for every layer. A mapping
            ``{glob: axis or "auto"}`` over layer names (first match wins; unmatched
            layers are ``"auto"``). A given axis wins over what the layer says; a
            contradiction is warned about (:class:`~covshift.probe.units.UnitAxisWarning`)
            and said in the record, as is every axis that had to be assumed. Each
            record's ``unit_axis`` says which axis was used and why.
        reduce: reduce statistics across the ranks of torch.distributed (each rank
            probes its own shard); None: whenever more than one process runs.
        process_group: the group to reduce over (None: the default group).
        background: run probe-batch records after the first in a worker thread, on a
            snapshot of the model (see :mod:`covshift.probe.background`): the training
            thread pays only for copying the parameters, and records reach the sink a
            few steps late (all of them by :meth:`flush` or :meth:`close`). None
            (default): when the model is on the CPU, torch leaves a core unused
            (``torch.get_num_threads() < os.cpu_count()``), the model has no hooks of
            its own, and no reduction across ranks is asked for. The numbers are the
            same either way.
        sink: called with every :class:`ProbeRecord`; by default records are kept in
            :attr:`records`.

    The keywords after ``probe_input`` are declared once, with their defaults, in
    :class:`~covshift.probe.settings.ProbeSettings` (shared with the trainer callbacks).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Sequence[LayerSpec] = "auto",
        probe_input: torch.Tensor | tuple[Any, ...] | Mapping[str, Any] | None = None,
        **settings: Unpack[ProbeSettings],
    ) -> None:
        given = resolve(settings, ProbeSettings, PROBE_DEFAULTS, "ShiftProbe.__init__")
        record, source, mode = given["record"], given["source"], given["mode"]
        check_modes(record, source, mode, given["background"])
        self._inputs = probe_batch(probe_input, source)
        quantiles = check_statistics(given["quantiles"], given["bins"], given["saturation_slope"])
        units = UnitPolicy.of(given["unit_dim"])
        self.schedule = Schedule.resolve(given["every"], given["steps"], given["schedule"])
        self.model = model
        selection = select_layers(model, layers)
        self.modules = selection.modules
        self._optional = selection.optional
        units.check_patterns(list(self.modules))
        self.units = units
        self._trace_units = units.needs_trace(self.modules, record)
        self.record = record
        self.source = source
        self.mode = mode
        self.config = StatsConfig(
            quantiles,
            given["bins"],
            given["unit_histograms"],
            given["saturation_slope"],
            units.everywhere if units.everywhere is not None else 1,
            given["pooled_quantiles"],
        )
        self.quantiles = quantiles
        self._reduce = given["reduce"]
        self._group = given["process_group"]
        self.records: list[ProbeRecord] = []
        self._delivery = RecordDelivery(
            list(self.modules), self._optional, given["sink"] or self.records.append
        )
        self._collector = self._new_collector(self._group_arg)
        self._taps = Taps(
            model,
            self.modules,
            record,
            self._collector.on_value,
            self._collector.on_feeds,
            self._collector.on_output if self._trace_units else None,
        )
        self._background_mode = given["background"]
        self._background: BackgroundRecorder | None = None
        self._checked = False  # a synchronous forward of the probe batch has succeeded
        self._armed: int | None = None  # live mode: the step label of the armed capture
        self._device_inputs: tuple[torch.device, ProbeBatch] | None = None

    def _new_collector(self, group: Callable[[], Any]) -> Collector:
        return Collector(self.config, self.record, group, self.units, self._trace_units)

    @property
    def unit_axes(self) -> dict[str, UnitAxis]:
        """Layer (record key) -> the unit axis of its latest record, and how it was
        found (empty before the first record)."""
        return dict(self._delivery.axes)

    @property
    def probe_input(self) -> torch.Tensor | None:
        """The first tensor of the probe batch (None with ``source="train"``)."""
        return None if self._inputs is None else self._inputs.first

    @property
    def layer_names(self) -> list[str]:
        """Names of the watched modules (records of repeated calls add ``#k``)."""
        return list(self.modules)

    # -- context manager: the probe owns no hooks outside a record ------------
    def __enter__(self) -> ShiftProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(flush=exc[0] is None)

    def close(self, flush: bool = True) -> None:
        """Remove every hook and stop the background worker. A record computed in the
        background is emitted in any case (it is complete); a finished live capture
        unless ``flush`` is False (an interrupted step)."""
        try:
            if self._background is not None:
                try:
                    self.flush()
                except Exception:
                    if flush:  # otherwise an exception is already on its way up
                        raise
            if flush and self._taps.done:
                self._finish_live()
        finally:
            if self._background is not None:
                self._background.close()
                self._background = None
            self._taps.remove()
            self._collector.clear()
            self._armed = None

    def flush(self) -> list[ProbeRecord]:
        """Wait for the record being computed in the background, if any, and emit it."""
        if self._background is None:
            return []
        return self._delivery.deliver(self._background.collect(wait=True))

    # -- what the hooks do ----------------------------------------------------
    def _group_arg(self) -> Any:
        reduce = self._reduce if self._reduce is not None else dist_ops.world_size() > 1
        return self._group if reduce else False

    def _emit(self, step: int, batch_norms: int = 0) -> list[ProbeRecord]:
        try:
            host = to_host(self._collector.pending)  # one transfer for the whole record
            for stats in host.values() if batch_norms else ():
                stats["norm_batch_stats"] = np.array(batch_norms, dtype=np.int64)
            axes = dict(self._collector.axes)
        finally:
            self._collector.clear()
        return self._delivery.deliver((step, host, self._collector.kinds, axes))

    # -- recording ------------------------------------------------------------
    def maybe_record(self, step: int) -> bool:
        """Call after each optimizer step. Probe batch: record now if ``step`` is due.
        Live batches: finish the capture of the forward just run, and arm the hooks for
        the next training forward if ``step`` is due. Returns whether ``step`` is due."""
        if self.source == "train":
            if self._taps.done:
                self._finish_live()
            if not self.schedule.due(step):
                return False
            self._arm(step)
            return True
        if self._background is not None:
            self._delivery.deliver(self._background.collect(wait=False))
        if not self.schedule.due(step):
            return False
        if self._use_background() and not untrained_norms(self.model):
            self._submit(step)
        else:
            self.record_now(step)
        return True

    def _use_background(self) -> bool:
        """Whether this record runs in the worker (see ``background``); the first
        record runs here, so that a probe batch that does not fit fails at once."""
        if self._background_mode is False or not self._checked or self.mode == "train":
            return False
        if self._group_arg() is not False:
            if self._background_mode:
                raise RuntimeError(
                    "probe: background recording cannot reduce statistics across ranks "
                    "(collectives must run on the training thread); pass background=False"
                )
            return False
        if self._background_mode is None:
            # The worker needs a core of its own: torch's OpenMP threads spin between
            # ops, and a worker that preempts one stalls every parallel op of training.
            spare_core = torch.get_num_threads() < (os.cpu_count() or 1)
            on_cpu = self._device_batch().first.device.type == "cpu"
            return spare_core and on_cpu and not has_foreign_hooks(self.model)
        return True

    def _submit(self, step: int) -> None:
        if self._background is None:
            self._background = BackgroundRecorder(
                list(self.modules),
                self.record,
                lambda: self._new_collector(lambda: False),
                _explain,
            )
        self.flush()  # at most one record in flight
        try:
            self._background.submit(step, self.model, self._device_batch())
        except RuntimeError:
            if self._background_mode:  # asked for explicitly: say why it cannot be
                raise
            self._background_mode = False  # e.g. a model deepcopy cannot copy
            self.record_now(step)

    def _arm(self, step: int) -> None:
        self._collector.clear()
        self._armed = step
        self._taps.attach(gated=True, on_forward_end=self._taps.remove)

    def _finish_live(self) -> list[ProbeRecord]:
        step, self._armed = self._armed, None
        self._taps.remove()
        self._taps.done = False
        if step is None:
            return []
        return self._emit(step)

    def _device_batch(self) -> ProbeBatch:
        assert self._inputs is not None
        device = model_device(self.model, self._inputs.first.device)
        # Move the probe batch once per device, not once per record.
        if self._device_inputs is None or self._device_inputs[0] != device:
            self._device_inputs = (device, self._inputs.to(device))
        return self._device_inputs[1]

    def _forward(self, batch: ProbeBatch) -> int:
        self._collector.clear()
        self._collector.batch = batch
        local = self._group_arg() is False
        batch_norms = probe_forward(self.model, batch, self.mode, self._taps, local=local)
        self._checked = True
        return batch_norms

    def record_now(self, step: int) -> list[ProbeRecord]:
        """Run the probe batch through the model and record every chosen layer."""
        if self.source == "train":
            raise RuntimeError(
                "record_now needs a probe batch; with source='train' the records come "
                "from the training forwards (call maybe_record(step) after each step)"
            )
        self.flush()  # records reach the sink in step order
        return self._emit(step, self._forward(self._device_batch()))

    def check(self) -> list[str]:
        """Run the probe batch once without recording: fails early, with a message
        naming the expected input shape, if the batch does not fit the model. Returns
        the record keys the forward produces."""
        if self.source == "train":
            raise RuntimeError("check needs a probe batch (source='probe')")
        self._forward(self._device_batch())
        keys = list(self._collector.pending)
        self._collector.clear()
        return keys

    # -- as a callback of the training loop, covshift.train() ------------------
    def on_train_start(self, state: Any) -> None:
        # Step 0 is the initialization; a resumed run starts at its checkpoint's step.
        self.maybe_record(state.step)

    def on_step_end(self, state: Any) -> None:
        self.maybe_record(state.step)

    def on_eval(self, state: Any, metrics: dict[str, float]) -> None:
        # A checkpoint may follow: every record up to this step must be in the sink.
        self.flush()

    def on_train_end(self, state: Any, status: str) -> None:
        # An armed capture whose forward never came is dropped; hooks go.
        self.close(flush=status == "finished")
