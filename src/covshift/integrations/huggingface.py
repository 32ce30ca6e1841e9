"""A Hugging Face ``transformers.TrainerCallback`` that probes the trainer's model.

Needs ``pip install 'covshift[huggingface]'`` (transformers and accelerate)::

    from covshift.integrations.huggingface import ShiftProbeCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    with ShiftProbeCallback(trainer, every=50, store="covshift-out/covshift.db") as probe:
        trainer.train()
    probe.records  # [ProbeRecord(step, layer, stats), ...]

What happens, event by event:

- ``on_train_begin`` (world process 0 only; the other ranks do nothing): layers of
  the trainer's model are selected as :class:`~covshift.probe.ShiftProbe` selects
  them (``"auto"``: every norm and activation), a run row is opened in the store
  when one is given, and the records of the global step training starts from (0, or
  the checkpoint's step when resuming) are taken if the probe batch was given.
- Probe batch: ``probe_input`` if given (a dict of keyword arguments, as the model's
  batches are), else **the first training batch**, as the trainer passes it to the
  model (a dict of ``input_ids``, ``attention_mask``, ``labels``, ...), copied and cut
  to its first ``probe_size`` examples, and fixed for the whole run. It is caught by a
  forward pre-hook on the model that fires once, in the first training forward, and
  is removed at once; the start step's records are taken right there, at the initial
  weights, before that forward goes on.
- ``on_step_end`` (once per optimizer step, so after ``gradient_accumulation_steps``
  micro-batches): the records due at ``state.global_step`` (steps 0, k, 2k, ... with
  ``every=k``).
- ``on_train_end``: the probe's hooks are removed and the run is closed as
  ``finished``. The trainer has no event for a failure: use the callback as a context
  manager around ``trainer.train()`` (the run is then closed as ``failed``, or
  ``interrupted`` on Ctrl-C, and the hooks go), or call :meth:`close`. Without
  either, a run left open is closed at the next ``train()`` or when the process ends.

What is recorded: per watched layer, the statistics of
:mod:`covshift.probe.record_summary` of its input (``record="input"``) on the probe batch,
in eval mode under ``no_grad`` (``mode="eval"``), with each layer's units on the axis
its layer says (``unit_dim="auto"``: a transformer's hidden features of ``(N, T, E)``
values, a convolution's channels; every record names its axis). With ``grad_ics=True``, the gradient
ICS of every weight layer (:func:`covshift.probe.gradient_ics`) on the probe batch,
whose ``labels`` give the loss (``grad_ics_loss``: by default the model output's
``loss``), with the trainer's optimizer (unwrapped from accelerate).

What is logged: per record, every 0-d statistic as ``covshift/<layer>/<stat>``
(``pooled_mean``, ``pooled_std``, ``pooled_saturation``, ``grad_ics_l2``, ...) and
the shift against the layer's first record as ``covshift/<layer>/shift/<metric>``,
at the step of the record. They go where ``trainer.log`` sends the trainer's own
logs: ``state.log_history``, and the ``on_log`` of every callback of the trainer (the
reporting callbacks of ``report_to``: TensorBoard, which names them
``train/covshift/...``, W&B, MLflow, ...), except the progress printers (one long
dict per record on the console). Without the trainer (a callback is not given its
trainer: pass it, or set :attr:`trainer`), they go to ``state.log_history`` only.
The store, when given, receives every record and the trainer's own logged scalars
(loss, learning rate, ...).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "covshift.integrations.huggingface needs transformers (and accelerate, which its "
        "Trainer uses): pip install 'covshift[huggingface]'"
    ) from error

from covshift.integrations._session import ProbeSession
from covshift.integrations._settings import CallbackSettings
from covshift.probe.record import ProbeRecord
from covshift.probe.select import LayerSpec
from covshift.probe.settings import Unpack

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

__all__ = ["ShiftProbeCallback"]

# The callbacks that print logs rather than keep them (skipped for the records' summaries).
_PRINTERS = frozenset({"PrinterCallback", "ProgressCallback", "NotebookProgressCallback"})
# What the Trainer's callback handler passes to every event besides args, state, control.
_HANDLER_KWARGS = (
    "model",
    "processing_class",
    "optimizer",
    "lr_scheduler",
    "train_dataloader",
    "eval_dataloader",
)

# Keyword arguments the Trainer adds to the model's batch that are not part of it.
_NOT_BATCH = ("num_items_in_batch",)


def model_loss(output: Any, targets: Any = None) -> torch.Tensor:
    """The loss a Hugging Face model computes itself from the batch's ``labels``."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(
            "gradient ICS: the model returned no loss on the probe batch; the batch needs "
            "the labels the model's loss takes (e.g. 'labels'), or pass grad_ics_loss="
        )
    return loss


class ShiftProbeCallback(TrainerCallback):
    """Probe the Hugging Face Trainer's model (see the module docstring for the events).

    Args:
        trainer: the Trainer, whose callbacks include its loggers. Without it the
            summaries go to ``state.log_history`` only (set :attr:`trainer` later, or
            pass it here and ``trainer.add_callback(callback)``).
        layers: what to watch, as in :class:`~covshift.probe.ShiftProbe`: glob patterns
            over module names (``"transformer.h.*.mlp.act"``), module types, ``"auto"``
            (every norm and activation), ``"auto:linear"``, or a list of these.
        probe_input: a fixed probe batch (dict of keyword arguments, tensor, tuple, or
            ``(args, kwargs)``); None: the first training batch (module docstring).
        probe_size: examples kept of the first training batch (None: all).
        every / steps / schedule: when to record, in optimizer steps (default every
            100, from step 0).
        record, source, mode: as in ``ShiftProbe`` (``source="train"`` records the live
            training forwards instead of the probe batch).
        unit_dim: the axis of the units, as in ``ShiftProbe`` (default ``"auto"``: per
            layer, from the layer).
        grad_ics: also measure gradient ICS on the probe batch.
        grad_ics_every: its own schedule (None: that of the probe).
        grad_ics_layers: its layers (None: every module that owns a weight matrix).
        grad_ics_loss: ``loss(model output, None)``; default: the output's ``loss``.
        store: a :class:`~covshift.store.Store` or the path of one: a run row (status,
            config: the model's config, the training arguments, the probe's settings),
            every record, the trainer's logged scalars.
        run_name: the run's name in the store (default ``args.run_name`` or the model's
            class name).
        log_shift: log the shift against each layer's first record too.
        prefix: the logged names' prefix.
        quantiles, bins, unit_histograms, pooled_quantiles, saturation_slope,
            background: as in ``ShiftProbe`` (``background`` False by default here, so
            that the summaries reach the loggers at the step they belong to).

    The keywords after ``probe_input`` are declared once, in
    :class:`~covshift.integrations._settings.CallbackSettings`.

    Attributes:
        records: the :class:`~covshift.probe.ProbeRecord` s of the latest run (rank 0).
        run_id: its run in the store (None without a store).
    """

    def __init__(
        self,
        trainer: Trainer | None = None,
        *,
        layers: LayerSpec | Sequence[LayerSpec] = "auto",
        probe_input: Any = None,
        **settings: Unpack[CallbackSettings],
    ) -> None:
        self.trainer = trainer
        if settings.get("grad_ics_loss") is None:
            settings["grad_ics_loss"] = model_loss
        self.session = ProbeSession(
            layers=layers,
            probe_input=probe_input,
            caller="ShiftProbeCallback.__init__",
            **settings,
        )
        self._capture: torch.utils.hooks.RemovableHandle | None = None
        self._event: tuple[Any, Any, Any] | None = None  # (args, state, control) of the run

    @property
    def records(self) -> list[ProbeRecord]:
        return self.session.records

    @property
    def run_id(self) -> int | None:
        return self.session.run_id

    # -- events -----------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise RuntimeError("ShiftProbeCallback: the Trainer passed no model to on_train_begin")
        self._remove_capture()
        self._event = (args, state, control)
        config = {
            "trainer": f"transformers {transformers.__version__}",
            "model": type(model).__name__,
            "model_config": _to_dict(getattr(model, "config", None)),
            "training_args": _to_dict(args, "to_sanitized_dict"),
        }
        self.session.begin(
            model,
            step=state.global_step,
            enabled=state.is_world_process_zero,
            optimizer=optimizer,
            config=config,
            seed=getattr(args, "seed", None),
            default_name=getattr(args, "run_name", None) or type(model).__name__,
        )
        if self.session.needs_batch:
            self._capture = model.register_forward_pre_hook(self._first_batch, with_kwargs=True)
        reporters = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if self.trainer is None and self.session.active and reporters:
            warnings.warn(
                "ShiftProbeCallback was not given its Trainer: the probe's summaries go to "
                f"state.log_history only, not to report_to's {reporters}; pass "
                "ShiftProbeCallback(trainer, ...) and trainer.add_callback(callback)",
                stacklevel=2,
            )
        self._report()

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._event = (args, state, control)
        self.session.step(state.global_step, optimizer)
        self._report()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs:  # the trainer's own logs (loss, learning rate, eval_*, ...)
            self.session.log_metrics(state.global_step, logs)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._event = (args, state, control)
        self.close("finished")

    # -- ending -------------------------------------------------------------------
    def close(
        self,
        status: Literal["finished", "failed", "interrupted"] = "finished",
        error: str | None = None,
    ) -> None:
        """Remove every hook and close the store's run with ``status`` (no-op when no
        run is open)."""
        self._remove_capture()
        try:
            self.session.end(status, error)
        finally:
            self._report()

    def __enter__(self) -> ShiftProbeCallback:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: Any
    ) -> None:
        if error is None:
            self.close("interrupted", "train() returned without its train-end event")
        elif isinstance(error, KeyboardInterrupt):
            self.close("interrupted", "KeyboardInterrupt")
        else:
            self.close("failed", f"{type(error).__name__}: {error}")

    # -- internals ------------------------------------------------------------------
    def _first_batch(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # A training forward (not an evaluation, e.g. eval_on_start) carries the batch.
        if not (module.training and torch.is_grad_enabled()):
            return
        self._remove_capture()
        batch = {k: v for k, v in kwargs.items() if k not in _NOT_BATCH}
        self.session.set_batch((tuple(args), batch) if args else batch)
        self._report()

    def _remove_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _report(self) -> None:
        """Hand the summaries of new records to the trainer's loggers."""
        pending = self.session.take_scalars()
        if not pending or self._event is None:
            return
        args, state, control = self._event
        logs: dict[str, float] = {}
        for _, values in pending:  # the trainer's loggers label them with its step
            logs.update(values)
        state.log_history.append({**logs, "step": state.global_step})
        if self.trainer is None:
            return
        # What trainer.log does, less two things: the progress printers would print a
        # long dict per record, and the handler's on_log resets control.should_log,
        # which would swallow the trainer's own loss log of this step.
        handler = self.trainer.callback_handler
        extras = {name: getattr(handler, name, None) for name in _HANDLER_KWARGS}
        for callback in list(handler.callbacks):
            if callback is self or type(callback).__name__ in _PRINTERS:
                continue
            callback.on_log(args, state, control, logs=dict(logs), **extras)


def _to_dict(obj: Any, method: str = "to_dict") -> Any:
    """A JSON-friendly view of a config or the training arguments (None if it has none)."""
    convert = getattr(obj, method, None)
    if convert is None:
        return None
    try:
        return convert()
    except Exception:  # a config that cannot describe itself still trains
        return repr(obj)
