"""A PyTorch Lightning ``Callback`` that probes the LightningModule being trained.

Needs ``pip install 'covshift[lightning]'`` (``pytorch-lightning``; the ``lightning``
package works too: the callback is a ``Callback`` of whichever of the two, or both,
is installed)::

    from covshift.integrations.lightning import ShiftProbeCallback

    probe = ShiftProbeCallback(every=50, store="covshift-out/covshift.db")
    trainer = pl.Trainer(max_steps=5000, callbacks=[probe])
    trainer.fit(module, train_loader)
    probe.records  # [ProbeRecord(step, layer, stats), ...]

What happens, hook by hook (on global rank 0 only; the other ranks do nothing, so no
collective is ever waited for):

- ``on_train_start``: the layers are selected in the probed module (``module=``: the
  LightningModule itself by default, or a submodule by attribute path, or a
  function of the LightningModule) as :class:`~covshift.probe.ShiftProbe` selects
  them, a run row is opened in the store when one is given and, if the probe batch
  was given, the records of the global step training starts from (0, or the
  checkpoint's step when resuming) are taken.
- Probe batch: ``probe_input`` if given (what the probed module's forward takes),
  else **the first training batch**: at ``on_train_batch_start`` of the first batch
  (before any update), ``split_batch(batch)`` gives ``(inputs, targets)`` (by
  default ``(x, y)`` of a tuple or list batch, a tensor batch as the inputs, a dict
  batch as keyword arguments), and ``inputs``, copied and cut to the first
  ``probe_size`` examples, is fixed for the run; the start step's records are taken
  then. The batch is already on the module's device.
- ``on_train_batch_end``: when ``trainer.global_step`` moved (an optimizer step was
  taken: with ``accumulate_grad_batches=k`` once every k batches), the records due at
  that step (steps 0, k, 2k, ... with ``every=k``).
- ``on_train_end``: hooks removed, the run closed as ``finished``;
  ``on_exception``: the same, as ``failed`` (``interrupted`` on Ctrl-C).

What is recorded: per watched layer, the statistics of :mod:`covshift.probe.record_summary`
of its input on the probe batch, in eval mode under ``no_grad``, with each layer's
units on the axis its layer says (``unit_dim="auto"``; every record names its axis).
With ``grad_ics=True``, the gradient ICS of every weight layer
(:func:`covshift.probe.gradient_ics`) on the probe batch and its targets, with
``grad_ics_loss(module(inputs), targets)`` and the trainer's one optimizer.

What is logged: per record, every 0-d statistic as ``covshift/<layer>/<stat>``
(``pooled_mean``, ``pooled_std``, ``pooled_saturation``, ``grad_ics_l2``, ...) and
the shift against the layer's first record as ``covshift/<layer>/shift/<metric>``,
with ``log_metrics(metrics, step=record step)`` of every logger in
``trainer.loggers`` (TensorBoard, CSV, W&B, MLflow, ...): at the record's own step,
whatever ``log_every_n_steps`` is. The store, when given, receives every record and
the trainer's ``callback_metrics`` at each record step and after each validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from covshift.integrations._session import ProbeSession
from covshift.integrations._settings import SessionSettings
from covshift.probe.record import ProbeRecord
from covshift.probe.select import LayerSpec
from covshift.probe.settings import Unpack

_BASES: list[type] = []
_VERSIONS: list[str] = []
try:
    import lightning.pytorch as _lightning

    _BASES.append(_lightning.Callback)
    _VERSIONS.append(f"lightning {_lightning.__version__}")
except ImportError:
    pass
try:
    import pytorch_lightning as _pytorch_lightning

    _BASES.append(_pytorch_lightning.Callback)
    _VERSIONS.append(f"pytorch-lightning {_pytorch_lightning.__version__}")
except ImportError:
    pass
if not _BASES:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "covshift.integrations.lightning needs PyTorch Lightning: "
        "pip install 'covshift[lightning]' (or pip install lightning)"
    )


__all__ = ["ShiftProbeCallback", "split_batch"]


def _has_forward(pl_module: nn.Module) -> bool:
    """Whether a LightningModule has a forward of its own, rather than Lightning's or
    torch's, which only raise."""
    forward = getattr(type(pl_module), "forward", None)
    where = getattr(forward, "__module__", None) or ""
    return not where.startswith(("lightning.", "pytorch_lightning.", "torch."))


ModuleSpec = str | Callable[[nn.Module], nn.Module] | None


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a training batch, by default: ``(x, y, ...)`` gives
    ``(x, y)``; a tensor is the inputs alone; a dict is the keyword arguments of the
    forward (its targets, if any, among them)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return dict(batch), None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"cannot tell the inputs of a training batch of type {type(batch).__name__}; pass "
        "split_batch=lambda batch: (inputs, targets) to ShiftProbeCallback"
    )


class ShiftProbeCallback(*_BASES):  # type: ignore[misc]
    """Probe the module a Lightning Trainer trains (see the module docstring).

    Args:
        layers: what to watch, as in :class:`~covshift.probe.ShiftProbe` (names are
            those inside the probed module): glob patterns (``"net.*"``), module types,
            ``"auto"`` (every norm and activation), ``"auto:linear"``, or a list.
        module: the module to probe: None (the LightningModule, whose ``forward`` then
            takes the probe batch), an attribute path (``"net"``, ``"model.encoder"``),
            or a function of the LightningModule.
        probe_input: a fixed probe batch, what the probed module takes; None: the
            inputs of the first training batch.
        probe_target: the targets of ``probe_input`` (gradient ICS only).
        probe_size: examples kept of the first training batch (None: all).
        split_batch: ``batch -> (inputs, targets)`` (default :func:`split_batch`).
        every / steps / schedule: when to record, in optimizer steps (the trainer's
            ``global_step``; default every 100, from step 0).
        record, source, mode, unit_dim: as in ``ShiftProbe``.
        grad_ics: also measure gradient ICS on the probe batch.
        grad_ics_every: its own schedule (None: that of the probe).
        grad_ics_layers: its layers (None: every module that owns a weight matrix).
        grad_ics_loss: ``loss(module(inputs), targets)`` -> scalar (needed with
            ``grad_ics``: the LightningModule's loss lives in its ``training_step``).
        store: a :class:`~covshift.store.Store` or the path of one: a run row (status,
            config: the module's class and hyperparameters, the trainer's step
            settings, the probe's settings), every record, ``callback_metrics``.
        run_name: the run's name in the store (default: the module's class name).
        log_shift: log the shift against each layer's first record too.
        prefix: the logged names' prefix.
        quantiles, bins, unit_histograms, pooled_quantiles, saturation_slope,
            background: as in ``ShiftProbe`` (``background``: False by default here).

    The keywords after ``split_batch`` are declared once, in
    :class:`~covshift.integrations._settings.SessionSettings`.

    Attributes:
        records: the :class:`~covshift.probe.ProbeRecord` s of the latest fit (rank 0).
        run_id: its run in the store (None without a store).
    """

    def __init__(
        self,
        *,
        layers: LayerSpec | Sequence[LayerSpec] = "auto",
        module: ModuleSpec = None,
        probe_input: Any = None,
        split_batch: Callable[[Any], tuple[Any, Any]] = split_batch,
        **settings: Unpack[SessionSettings],
    ) -> None:
        if settings.get("grad_ics") and settings.get("grad_ics_loss") is None:
            raise ValueError(
                "grad_ics=True needs grad_ics_loss=, the loss of the probed module's output "
                "and the targets (e.g. torch.nn.functional.cross_entropy)"
            )
        self.module = module
        self.split_batch = split_batch
        self.session = ProbeSession(
            layers=layers,
            probe_input=probe_input,
            caller="ShiftProbeCallback.__init__",
            **settings,
        )
        self._last_step: int | None = None

    @property
    def records(self) -> list[ProbeRecord]:
        return self.session.records

    @property
    def run_id(self) -> int | None:
        return self.session.run_id

    # -- hooks ------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        probed = self._probed(pl_module)
        self._last_step = trainer.global_step
        hparams = getattr(pl_module, "hparams", None)
        config = {
            "trainer": " + ".join(_VERSIONS),
            "model": type(pl_module).__name__,
            "probed_module": type(probed).__name__,
            "hparams": dict(hparams) if isinstance(hparams, Mapping) else None,
            "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }
        self.session.begin(
            probed,
            step=trainer.global_step,
            enabled=trainer.is_global_zero,
            optimizer=self._optimizer(trainer),
            config=config,
            default_name=type(pl_module).__name__,
        )
        self._report(trainer)

    def on_train_batch_start(
        self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int
    ) -> None:
        if self.session.needs_batch:
            self.session.set_batch(*self.split_batch(batch))
            self._report(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a batch of gradient accumulation: no update yet
            return
        self._last_step = step
        self.session.step(step, self._optimizer(trainer))
        if self.session.active and self.session.schedule.due(step):
            self.session.log_metrics(step, trainer.callback_metrics)
        self._report(trainer)

    def on_validation_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if not trainer.sanity_checking:
            self.session.log_metrics(trainer.global_step, trainer.callback_metrics)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self.session.end("finished")
        self._report(trainer)

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self.session.end(status, f"{type(exception).__name__}: {exception}")

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        # Reached without on_train_end or on_exception only if fit stopped in between.
        self.session.end("interrupted", "the trainer tore down before the train end")

    # -- internals ------------------------------------------------------------------
    def _probed(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            if not _has_forward(pl_module):
                raise TypeError(
                    f"{type(pl_module).__name__} defines no forward, which the probe batch "
                    "goes through: pass module= (e.g. module='net', the submodule its "
                    "training_step calls), or define forward"
                )
            return pl_module
        if isinstance(self.module, str):
            return pl_module.get_submodule(self.module)
        found = self.module(pl_module)
        if not isinstance(found, nn.Module):
            raise TypeError(
                f"module= must give an nn.Module of the LightningModule, got {type(found).__name__}"
            )
        return found

    def _optimizer(self, trainer: Any) -> Any:
        if not self.session.grad_ics:
            return None
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if len(optimizers) != 1:
            raise ValueError(
                f"gradient ICS steps a copy of the trainer's optimizer, and the trainer has "
                f"{len(optimizers)}; use grad_ics=False with more than one"
            )
        return optimizers[0]

    def _report(self, trainer: Any) -> None:
        """Hand the summaries of new records to every logger, at their own steps."""
        for step, values in self.session.take_scalars():
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
