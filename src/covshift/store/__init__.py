"""The results store (SQLite): runs, their series and probe records, experiments."""

from covshift.store.housekeeping import Orphan, close_stale_runs, orphan_checkpoints, stale_runs
from covshift.store.schema import RUN_STATUSES, SCHEMA_VERSION
from covshift.store.store import (
    DEFAULT_DB,
    FINAL_OUTCOMES,
    Claim,
    ExperimentPoint,
    NewRun,
    ProbeUnits,
    RunInfo,
    Store,
    StoreError,
    pid_alive,
)

__all__ = [
    "DEFAULT_DB",
    "FINAL_OUTCOMES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Claim",
    "ExperimentPoint",
    "NewRun",
    "Orphan",
    "ProbeUnits",
    "RunInfo",
    "Store",
    "StoreError",
    "close_stale_runs",
    "orphan_checkpoints",
    "pid_alive",
    "stale_runs",
]
