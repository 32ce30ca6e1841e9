"""ProbeRecord, and how the summaries of one forward become records in the sink.

A record is made in two halves. During a forward, the hooks' collector
(:mod:`~covshift.probe.collector`) summarizes every watched layer's values on their
device; once those summaries are on the host (one transfer per record), a
:class:`RecordDelivery` checks that every watched layer was called, warns once per
layer whose unit axis is in doubt, and hands one :class:`ProbeRecord` per layer to the
sink. The second half always runs on the thread that owns the sink (sinks such as the
SQLite store stay on the thread that made them), whether the forward ran there or in
the background worker (:mod:`~covshift.probe.background`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from covshift.probe.units import UnitAxis, UnitAxisWarning

__all__ = ["HostRecord", "ProbeRecord", "RecordDelivery", "RecordSink"]


@dataclass(frozen=True)
class ProbeRecord:
    """Statistics of one layer at one step: name -> numpy array.

    ``stats["quantiles"]`` has shape ``(len(quantile_levels), U)``; ``stats["mean"]`` and
    ``stats["std"]`` have shape ``(U,)``; the other keys are listed in
    :mod:`covshift.probe.record_summary`, and ``norm_batch_stats`` (0-d, present only then) is
    the number of norm layers that normalized the probe batch with its own statistics
    (:mod:`covshift.probe.norm_stats`). ``activation`` is the kind of activation the values
    feed (``"sigmoid"``, ``"tanh"``, ``"relu"``), which the saturation figures refer to.
    ``unit_axis`` is the axis of the recorded values that holds the ``U`` units and how
    it was found (:class:`~covshift.probe.units.UnitAxis`; None for records that are not
    per unit, such as gradient ICS and smoothness).
    """

    step: int
    layer: str
    stats: dict[str, np.ndarray]
    activation: str | None = None
    unit_axis: UnitAxis | None = None


RecordSink = Callable[[ProbeRecord], None]

# A record whose summaries are on the host, before it is delivered: step, layer ->
# stats, layer -> activation kind, layer -> unit axis.
HostRecord = tuple[int, dict[str, dict[str, np.ndarray]], dict[str, str], dict[str, UnitAxis]]


class RecordDelivery:
    """Hands finished records to the sink, and remembers what they said per layer.

    Args:
        layers: the names of the watched modules.
        optional: those of them that a forward may leave uncalled.
        sink: called with every :class:`ProbeRecord`.
    """

    def __init__(self, layers: Sequence[str], optional: Collection[str], sink: RecordSink) -> None:
        self.layers = list(layers)
        self.optional = optional
        self.sink = sink
        self.kinds: dict[str, str] = {}  # layer -> activation kind, over all records
        self.axes: dict[str, UnitAxis] = {}  # layer -> unit axis of its latest record
        self._doubted: set[str] = set()  # layers whose doubtful axis was warned about

    def deliver(self, finished: HostRecord | None) -> list[ProbeRecord]:
        """Hand one record (step, layer -> host stats, layer -> activation kind,
        layer -> unit axis) to the sink, on the calling thread."""
        if finished is None:
            return []
        step, host, kinds, axes = finished
        self._check_called(host)
        self.kinds.update(kinds)
        self.axes.update(axes)
        self._warn_doubts(axes)
        records = []
        for key, stats in host.items():
            record = ProbeRecord(step, key, stats, self.kinds.get(key), axes.get(key))
            self.sink(record)
            records.append(record)
        return records

    def _check_called(self, keys: Iterable[str]) -> None:
        called = {key.partition("#")[0] for key in keys}
        missing = [n for n in self.layers if n not in called and n not in self.optional]
        if missing:
            raise RuntimeError(f"probe: layers {missing} were not called by the model's forward")
        if not called:
            raise RuntimeError(
                f"probe: none of the layers {self.layers} was called by the model's "
                "forward; choose layers that the forward calls"
            )

    def _warn_doubts(self, axes: Mapping[str, UnitAxis]) -> None:
        """Warn once per layer whose unit axis was assumed or contradicts the layer."""
        doubted = [(k, a) for k, a in axes.items() if a.doubt and k not in self._doubted]
        if not doubted:
            return
        self._doubted.update(k for k, _ in doubted)
        shown = "; ".join(f"{k!r}: axis {a.dim}, {a.doubt}" for k, a in doubted[:6])
        more = f"; and {len(doubted) - 6} more" if len(doubted) > 6 else ""
        # stacklevel 3: the warning points at the probe method that delivered the record.
        warnings.warn(
            UnitAxisWarning(
                f"probe: the unit axis of {len(doubted)} layer(s) is not certain ({shown}"
                f"{more}). Each record's unit_axis says how its axis was found; where it "
                "is wrong, give it with unit_dim={'<layer pattern>': <axis>}"
            ),
            stacklevel=3,
        )
