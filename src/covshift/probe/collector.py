"""What the hooks do with a captured value: summarize it at once into one record.

A :class:`Collector` receives the values that :class:`~covshift.probe.hooks.Taps`
captures during one forward and keeps only their summaries
(:func:`~covshift.probe.record_summary.summarize`), keyed by layer (``name#k`` for repeated
calls), plus the kind of activation each layer feeds and the axis of its units
(:mod:`covshift.probe.units`). One collector serves one forward
at a time; the background recorder gives each of its forwards a collector of its own,
so that the training thread and the worker never share one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from covshift.probe.batch import ProbeBatch
from covshift.probe.record_summary import StatsConfig, saturation_stats, summarize
from covshift.probe.saturation import activation_kind
from covshift.probe.units import UnitAxis, UnitPolicy, UnitTrace, resolve_unit_axis

__all__ = ["Collector"]


class Collector:
    """Summaries of the values of one forward.

    Args:
        config: what to compute per layer.
        record: ``"input"`` or ``"output"`` (for the error message and the saturation
            of activation inputs).
        group: called at each value, returns the process group to reduce over, or
            False to keep statistics local (the world size may change after the probe
            is made, so it is asked each time).
        units: the user's ``unit_dim`` (None: one axis for all, ``config.unit_dim``).
        trace: whether the tensors of the forward are traced to their producers
            (:class:`~covshift.probe.units.UnitTrace`; pass :meth:`on_output` to the taps).
    """

    def __init__(
        self,
        config: StatsConfig,
        record: str,
        group: Callable[[], Any],
        units: UnitPolicy | None = None,
        trace: bool = False,
    ) -> None:
        self.config = config
        self.record = record
        self.group = group
        self.units = units if units is not None else UnitPolicy(config.unit_dim)
        self.trace = UnitTrace() if trace else None
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.kinds: dict[str, str] = {}
        self.axes: dict[str, UnitAxis] = {}
        # The probe batch of the forward being collected (None: live training batches,
        # whose size the collector does not know); its N is checked on every value.
        self.batch: ProbeBatch | None = None

    def clear(self) -> None:
        self.pending.clear()
        self.axes.clear()
        if self.trace is not None:
            self.trace.clear()

    def on_output(
        self, name: str, module: nn.Module, feed: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        if self.trace is not None:
            self.trace.on_output(name, module, feed, out)

    def on_value(
        self, key: str, module: nn.Module, value: torch.Tensor, feed: torch.Tensor | None = None
    ) -> None:
        if self.batch is not None:
            self.batch.check_value(key, self.record, value)
        if value.dim() < 2:
            raise ValueError(
                f"probe: the {self.record} of layer {key!r} has shape {tuple(value.shape)}; "
                "expected a batch (N, ...) with units along one of its other axes"
            )
        axis = resolve_unit_axis(
            key,
            module,
            value,
            self.record,
            self.units,
            self.trace,
            feed if feed is not None else value,
        )
        self.axes[key] = axis
        kind = activation_kind(module) if self.record == "input" else None
        if kind is not None:
            self.kinds[key] = kind
        self.pending[key] = summarize(value, self.config, self.group(), kind, unit_dim=axis.dim)

    def on_feeds(self, key: str, activation: nn.Module, value: torch.Tensor) -> None:
        kind = activation_kind(activation)
        if kind is not None and key in self.pending:
            dim = self.axes[key].dim if key in self.axes else None
            stats = saturation_stats(value, kind, self.config, self.group(), unit_dim=dim)
            self.pending[key].update(stats)
            self.kinds[key] = kind
