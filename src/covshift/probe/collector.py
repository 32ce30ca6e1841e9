"""What the hooks do with a captured value: summarize it at once into one record.

A :class:`Collector` receives the values that :class:`~covshift.probe.hooks.Taps`
captures during one forward and keeps only their summaries
(:func:`~covshift.probe.summary.summarize`), keyed by layer (``name#k`` for repeated
calls), plus the kind of activation each layer feeds. One collector serves one forward
at a time; the background recorder gives each of its forwards a collector of its own,
so that the training thread and the worker never share one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from covshift.probe.batch import ProbeBatch
from covshift.probe.saturation import activation_kind
from covshift.probe.summary import StatsConfig, saturation_stats, summarize

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
    """

    def __init__(self, config: StatsConfig, record: str, group: Callable[[], Any]) -> None:
        self.config = config
        self.record = record
        self.group = group
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.kinds: dict[str, str] = {}
        # The probe batch of the forward being collected (None: live training batches,
        # whose size the collector does not know); its N is checked on every value.
        self.batch: ProbeBatch | None = None

    def clear(self) -> None:
        self.pending.clear()

    def on_value(self, key: str, module: nn.Module, value: torch.Tensor) -> None:
        if self.batch is not None:
            self.batch.check_value(key, self.record, value)
        if value.dim() < 2:
            raise ValueError(
                f"probe: the {self.record} of layer {key!r} has shape {tuple(value.shape)}; "
                "expected a batch (N, ...) with units along unit_dim"
            )
        kind = activation_kind(module) if self.record == "input" else None
        if kind is not None:
            self.kinds[key] = kind
        self.pending[key] = summarize(value, self.config, self.group(), kind)

    def on_feeds(self, key: str, activation: nn.Module, value: torch.Tensor) -> None:
        kind = activation_kind(activation)
        if kind is not None and key in self.pending:
            self.pending[key].update(saturation_stats(value, kind, self.config, self.group()))
            self.kinds[key] = kind
