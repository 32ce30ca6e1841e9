"""Backends: what executes a sweep's points (in this process, a local pool, Ray)."""

from covshift.experiments.backends.base import Backend, BackendError, SweepContext, SweepEvents
from covshift.experiments.backends.inline import InlineBackend
from covshift.experiments.backends.pool import PoolBackend

__all__ = ["Backend", "BackendError", "InlineBackend", "PoolBackend", "SweepContext", "SweepEvents"]
