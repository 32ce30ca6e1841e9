"""The covshift store's run row of one probed training run.

When a callback is given a store (a :class:`~covshift.store.Store`, or the path of
one), each training run gets a run row: opened at train start with the trainer's and
the probe's settings, given every record and the trainer's own scalars, and closed
with the run's status. A store given by path is opened and closed with the run; one
given as a ``Store`` stays open, for its owner to close. Without a store, every call
does nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch

from covshift.callbacks import StoreRecorder
from covshift.probe.record import ProbeRecord
from covshift.store import Store

__all__ = ["RunStatus", "StoreRun", "StoreSpec"]

StoreSpec = Store | str | os.PathLike[str] | None
RunStatus = Literal["finished", "failed", "interrupted"]


def _json_safe(value: Any) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))


class StoreRun:
    """The run row in the store ``spec`` (None: no store, and nothing is written).

    Attributes:
        store: the open store (None without one, or once a store opened by path is
            closed).
        run_id: the run row (None before :meth:`open`); kept after :meth:`finish`.
    """

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec
        self.store: Store | None = None
        self.run_id: int | None = None
        self._recorder: StoreRecorder | None = None
        self._own_store = False

    def open(
        self, name: str, config: Mapping[str, Any], seed: int | None, device: torch.device
    ) -> None:
        """Open the store (given by path) and start a run row named ``name``."""
        spec = self.spec
        if spec is None:
            return
        self._own_store = not isinstance(spec, Store)
        self.store = spec if isinstance(spec, Store) else Store(spec)
        self.run_id = self.store.start_run(
            name,
            config=_json_safe(config),
            seed=seed,
            device=str(device),
            torch_version=torch.__version__,
            threads=torch.get_num_threads(),
        )
        self._recorder = StoreRecorder(self.store, self.run_id)

    def log_record(self, record: ProbeRecord) -> None:
        if self._recorder is not None:
            self._recorder.probe_sink(record)

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """The trainer's own scalars (loss, learning rate, ...): the numbers among
        ``values`` (one-element tensors too)."""
        if self._recorder is None:
            return
        numbers = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, (int, float, torch.Tensor))
            and not isinstance(v, bool)
            and (not isinstance(v, torch.Tensor) or v.numel() == 1)
        }
        if numbers:
            self._recorder.log_scalars(int(step), numbers)

    def finish(self, status: RunStatus, error: str | None) -> None:
        """Close the run row with ``status``, and the store if it was opened by path."""
        store, recorder = self.store, self._recorder
        if store is None or recorder is None:
            return
        try:
            recorder.finish(status, error)
        finally:
            if self._own_store:
                store.close()
                self.store = None
                self._recorder = None
