"""ShiftProbe: record per-unit statistics of chosen layers on a fixed probe batch.

Mechanics, schedule and statistics are separate (as in fastai's hooks):

- *mechanics*: forward hooks that exist only while the probe batch runs, so a
  training step between records pays nothing; a record is a no-grad forward in eval
  mode (no running-statistic update, no dropout), and the model's mode is restored;
- *schedule*: :class:`~covshift.probe.schedule.Schedule` says which steps record;
- *statistics*: :mod:`covshift.probe.stats` on the detached values inside the hook,
  so no activation outlives its hook.

Using the same probe batch at every record separates what the parameters did from
batch-sampling noise.

Example (your own loop)::

    probe = ShiftProbe(model, layers=["hidden.*.act"], probe_input=x_test[:1000], every=100)
    with probe:                        # hooks are removed on exit, whatever happens
        for step in range(1, steps + 1):
            ...                        # your training step
            probe.maybe_record(step)
    probe.records                      # [ProbeRecord(step, layer, stats), ...]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from covshift.probe.schedule import Schedule
from covshift.probe.stats import unit_moments, unit_quantiles, unit_view

__all__ = ["ProbeRecord", "ShiftProbe"]

DEFAULT_QUANTILES = (0.15, 0.5, 0.85)


@dataclass(frozen=True)
class ProbeRecord:
    """Statistics of one layer at one step: name -> per-unit numpy array.

    ``stats["quantiles"]`` has shape ``(len(quantile_levels), U)``; ``stats["mean"]`` and
    ``stats["std"]`` have shape ``(U,)``.
    """

    step: int
    layer: str
    stats: dict[str, np.ndarray]


RecordSink = Callable[[ProbeRecord], None]


class ShiftProbe:
    """Record the distribution of the inputs (or outputs) of chosen layers.

    Args:
        model: any ``nn.Module``.
        layers: module names or glob patterns (``"hidden.*.act"``); each must match at
            least one module.
        probe_input: the fixed probe batch, passed to ``model`` as is.
        every: record at steps 0, k, 2k, ... (or give ``steps``).
        steps: explicit steps to record at, instead of ``every``.
        record: ``"input"`` (the first positional input of the layer, e.g. the
            pre-activation fed to a sigmoid) or ``"output"``.
        quantiles: quantile levels to record per unit.
        sink: called with every :class:`ProbeRecord`; by default records are kept in
            :attr:`records`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        probe_input: torch.Tensor,
        *,
        every: int | None = None,
        steps: Iterable[int] | None = None,
        record: str = "input",
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        sink: RecordSink | None = None,
    ) -> None:
        if record not in ("input", "output"):
            raise ValueError(f"record must be 'input' or 'output', got {record!r}")
        if not isinstance(probe_input, torch.Tensor) or probe_input.dim() < 2:
            raise ValueError(
                "probe_input must be a batch tensor of shape (N, ...) with N >= 2, got "
                f"{type(probe_input).__name__} {tuple(getattr(probe_input, 'shape', ()))}"
            )
        if not all(0.0 <= q <= 1.0 for q in quantiles) or list(quantiles) != sorted(quantiles):
            raise ValueError(
                f"quantiles must be increasing levels in [0, 1], got {list(quantiles)}"
            )
        self.model = model
        self.modules = self._select(model, layers)
        self.probe_input = probe_input
        if every is None and steps is None:
            every = 100
        self.schedule = Schedule(every=every, steps=steps)
        self.record = record
        self.quantiles = tuple(float(q) for q in quantiles)
        self.records: list[ProbeRecord] = []
        self._sink = sink or self.records.append
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: dict[str, torch.Tensor] = {}

    @staticmethod
    def _select(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
        if isinstance(patterns, str):
            patterns = [patterns]
        named = dict(model.named_modules())
        chosen: dict[str, nn.Module] = {}
        for pattern in patterns:
            hits = [name for name in named if name and fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                sample = ", ".join(n for n in list(named)[1:13])
                raise ValueError(
                    f"layer pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names look like: {sample}"
                )
            for name in hits:
                chosen.setdefault(name, named[name])
        return chosen

    @property
    def layer_names(self) -> list[str]:
        return list(self.modules)

    # -- context manager: the probe owns no hooks outside a record -----------
    def __enter__(self) -> ShiftProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _hook_for(self, name: str) -> Callable[..., None]:
        def capture(module: nn.Module, args: tuple[object, ...], output: object = None) -> None:
            value = args[0] if self.record == "input" else output
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"probe: {self.record} of layer {name!r} is "
                    f"{type(value).__name__}, not a tensor"
                )
            self._pending[name] = self._summarize(value.detach())

        return capture

    def _summarize(self, value: torch.Tensor) -> torch.Tensor:
        # Everything per record is packed into one tensor so that the host transfer is
        # a single synchronization: rows = quantiles..., mean, std.
        units = unit_view(value)  # (M, U)
        mean, std = unit_moments(units)
        quantiles = unit_quantiles(units, self.quantiles).double()
        return torch.cat([quantiles, mean[None], std[None]])

    # -- recording -----------------------------------------------------------
    def maybe_record(self, step: int) -> bool:
        """Record if the schedule says so; returns whether it recorded."""
        if not self.schedule.due(step):
            return False
        self.record_now(step)
        return True

    @torch.no_grad()
    def record_now(self, step: int) -> list[ProbeRecord]:
        """Run the probe batch through the model and record every chosen layer."""
        for name, module in self.modules.items():
            if self.record == "input":
                self._handles.append(module.register_forward_pre_hook(self._hook_for(name)))
            else:
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        was_training = self.model.training
        try:
            self.model.eval()
            device = next(self.model.parameters(), self.probe_input).device
            self.model(self.probe_input.to(device))
            packed = {name: t.cpu().numpy() for name, t in self._pending.items()}
        finally:
            self.model.train(was_training)
            self._remove_hooks()
        missing = [name for name in self.modules if name not in packed]
        if missing:
            raise RuntimeError(f"probe: layers {missing} were not called by the model's forward")
        n_q = len(self.quantiles)
        records = []
        for name, rows in packed.items():
            record = ProbeRecord(
                step,
                name,
                {
                    "quantiles": rows[:n_q].astype(np.float32),
                    "mean": rows[n_q].astype(np.float32),
                    "std": rows[n_q + 1].astype(np.float32),
                },
            )
            self._sink(record)
            records.append(record)
        return records

    # -- as a callback of covshift.train --------------------------------------
    def on_train_start(self, state: object) -> None:
        # Step 0 is the initialization; a resumed run starts at its checkpoint's step.
        self.maybe_record(state.step)  # type: ignore[attr-defined]

    def on_step_end(self, state: object) -> None:
        self.maybe_record(state.step)  # type: ignore[attr-defined]
