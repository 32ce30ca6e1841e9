"""Recording the probe batch off the training thread, on a snapshot of the model.

A fixed-batch record costs one forward of the probe batch plus the statistics of
every watched layer. For the Ioffe MLP (probe batch 1000, training batch 60) that is
about ten training steps of work, 10 % of the training time at a record every 100
steps, and the forward alone is four steps of it: no way of computing the statistics
brings a synchronous record under a few percent. On the CPU, where torch leaves a
core unused, the record can instead run in a worker thread on that core:

1. at the step, the training thread copies the model's parameters and buffers into
   a *snapshot*, a deep copy made once (``copy_`` of a few tensors: microseconds);
2. the worker runs the probe batch through the snapshot (eval mode, ``no_grad``),
   with the probe's hooks on the snapshot's modules, summarizes the values and moves
   them to the host;
3. the training thread hands the finished record to the sink at a later
   :meth:`~covshift.probe.ShiftProbe.maybe_record` call (sinks, such as the SQLite
   store, stay on the thread that made them), or at once on ``flush``.

The numbers are those of a synchronous record at the same step: same weights, same
buffers, same forward. What a snapshot does NOT carry are Python attributes that
modules change during training outside their parameters and buffers; and the
snapshot has no hooks, so a model with hooks of its own (weight_norm's pre-hook,
another tool's) is recorded synchronously by default, where those hooks run as they
do in any forward. At most one record is in flight; the next one waits for it, so
memory stays one snapshot plus one record's values.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from covshift.probe.batch import ProbeBatch, ProbeBatchError
from covshift.probe.collector import Collector
from covshift.probe.hooks import Taps
from covshift.probe.record import HostRecord
from covshift.probe.record_summary import to_host
from covshift.probe.units import UnitAxisError

__all__ = ["BackgroundRecorder", "ModelSnapshot", "has_foreign_hooks"]

# Module attributes that hold forward hooks (torch >= 2.0 names; absent ones are skipped).
_FORWARD_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def has_foreign_hooks(model: nn.Module) -> bool:
    """Whether any module of ``model`` has forward hooks (the probe's own are only
    attached during a record, so between records every hook is someone else's)."""
    modules = model.modules()
    return any(bool(getattr(m, attr, None)) for m in modules for attr in _FORWARD_HOOK_DICTS)


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _signature(model: nn.Module) -> tuple[Any, ...]:
    # What must not change for a snapshot to be refreshed by copying tensors: the
    # module tree and every tensor's shape, dtype and device.
    kinds = tuple(type(m) for m in model.modules())
    return kinds, tuple((t.shape, t.dtype, t.device) for t in _state(model))


class ModelSnapshot:
    """A deep copy of ``model`` in eval mode, refreshed from the model on demand."""

    def __init__(self, model: nn.Module) -> None:
        try:
            self.copy = copy.deepcopy(model)
        except Exception as error:
            raise RuntimeError(
                f"background recording needs copy.deepcopy of the model, and it failed: "
                f"{error}; pass background=False"
            ) from error
        self.copy.eval()
        self.copy.requires_grad_(False)
        for p in self.copy.parameters():
            p.grad = None  # deepcopy copied the gradients: the snapshot never needs them
        self.signature = _signature(model)
        self._targets = _state(self.copy)

    def matches(self, model: nn.Module) -> bool:
        return _signature(model) == self.signature

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Copy the model's current parameters and buffers into the snapshot."""
        for target, source in zip(self._targets, _state(model), strict=True):
            target.copy_(source)


def _single_threaded_worker() -> ThreadPoolExecutor:
    """A one-thread executor whose torch ops run on that thread alone.

    With torch's OpenMP backend every thread that runs a parallel op gets a team of
    ``torch.get_num_threads()`` threads: a worker with a team of its own beside the
    training thread's oversubscribes the cores, and OpenMP's spinning barriers then
    slow training several times over. ``torch.set_num_threads(1)`` on the worker sets
    its own OpenMP and MKL thread counts (both per thread) and torch's default for new
    threads, which the training thread then sets back to its own count.
    """
    threads = torch.get_num_threads()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covshift-probe")
    executor.submit(_use_one_thread).result()
    torch.set_num_threads(threads)  # the default for new threads, as it was
    return executor


def _use_one_thread() -> None:
    # torch initializes a thread's count lazily, from the default for new threads, at
    # its first parallel query: trigger that first, or it would undo the setting.
    torch.get_num_threads()
    torch.set_num_threads(1)


class BackgroundRecorder:
    """One worker thread that records the probe batch on a :class:`ModelSnapshot`.

    Args:
        names: the watched modules' names in the model (found again in the snapshot).
        record: ``"input"`` or ``"output"``.
        new_collector: a fresh :class:`Collector` for each record.
        explain: turns a forward's exception into the probe's error message.
    """

    def __init__(
        self,
        names: list[str],
        record: str,
        new_collector: Callable[[], Collector],
        explain: Callable[[nn.Module, ProbeBatch, Exception], Exception],
    ) -> None:
        self.names = names
        self.record = record
        self.new_collector = new_collector
        self.explain = explain
        self.snapshot: ModelSnapshot | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: tuple[int, Future[tuple[dict, dict, dict]]] | None = None

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def submit(self, step: int, model: nn.Module, inputs: ProbeBatch) -> None:
        """Snapshot ``model`` now and record ``inputs`` through it in the worker. The
        caller collects the previous record first (:meth:`collect`)."""
        assert self._in_flight is None, "collect the record in flight first"
        if self.snapshot is None or not self.snapshot.matches(model):
            self.snapshot = ModelSnapshot(model)
        self.snapshot.refresh(model)
        if self._executor is None:
            self._executor = _single_threaded_worker()
        self._in_flight = (step, self._executor.submit(self._record, self.snapshot.copy, inputs))

    def _record(self, net: nn.Module, inputs: ProbeBatch) -> tuple[dict, dict, dict]:
        # Runs in the worker: grad mode is per thread, so no_grad is set here.
        collector = self.new_collector()
        collector.batch = inputs
        modules = dict(net.named_modules())
        taps = Taps(
            net,
            {name: modules[name] for name in self.names},
            self.record,
            collector.on_value,
            collector.on_feeds,
            collector.on_output if collector.trace is not None else None,
        )
        with torch.no_grad():
            taps.attach()
            try:
                inputs(net)
            except (ProbeBatchError, UnitAxisError):
                raise
            except Exception as error:
                taps.remove()
                raise self.explain(net, inputs, error) from error
            finally:
                taps.remove()
            return to_host(collector.pending), dict(collector.kinds), dict(collector.axes)

    def collect(self, wait: bool) -> HostRecord | None:
        """The finished record, if any (waiting for the one in flight with ``wait``);
        an error of the worker is raised here."""
        if self._in_flight is None:
            return None
        step, future = self._in_flight
        if not wait and not future.done():
            return None
        self._in_flight = None
        host, kinds, axes = future.result()
        return step, host, kinds, axes

    def close(self) -> None:
        """Stop the worker (a record in flight is finished first, and dropped)."""
        self._in_flight = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.snapshot = None
