"""The results store (SQLite): runs, their series and probe records, experiments."""

from covshift.store.errors import NoStoreError, StorageFault, StoreDamagedError, StoreError
from covshift.store.housekeeping import (
    Orphan,
    close_stale_runs,
    orphan_checkpoints,
    set_aside_checkpoints,
    stale_runs,
)
from covshift.store.ownership import pid_alive
from covshift.store.rows import (
    FINAL_OUTCOMES,
    RUN_STATUSES,
    Claim,
    Event,
    ExperimentPoint,
    NewRun,
    ProbeUnits,
    RunInfo,
)
from covshift.store.schema import SCHEMA_VERSION
from covshift.store.store import DEFAULT_DB, Store

__all__ = [
    "DEFAULT_DB",
    "FINAL_OUTCOMES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Claim",
    "Event",
    "ExperimentPoint",
    "NewRun",
    "NoStoreError",
    "Orphan",
    "ProbeUnits",
    "RunInfo",
    "StorageFault",
    "Store",
    "StoreDamagedError",
    "StoreError",
    "close_stale_runs",
    "orphan_checkpoints",
    "pid_alive",
    "set_aside_checkpoints",
    "stale_runs",
]
