"""The results store: one SQLite database for every run (WAL mode, versioned schema).

The store knows nothing about torch: it takes Python scalars and numpy arrays. Every
write is its own transaction, so a crash or Ctrl-C leaves what was recorded intact,
and a run that ends early is marked ``interrupted`` or ``failed``, never left as
``running`` (unless the process is killed outright; :meth:`Store.runs` then reports
it as ``stale`` once its process is gone). Many processes may write one store at
once (WAL; each transaction takes the write lock with ``BEGIN IMMEDIATE``).

Tables (see :mod:`covshift.store.schema` for the columns and the migrations):
    meta(key, value)                      schema_version, created_by, store_id
    runs(...)                             one row per run; ``point`` unique
    scalars(run_id, name, step, value)    loss, test accuracy, ...
    probe_records(run_id, layer, stat, step, dtype, shape, data,
                  unit_dim, unit_source, unit_rule)
                                          one numpy array per (layer, statistic, step),
                                          with the axis that held the record's units
    experiments(id, name, config, created_at)
    experiment_points(experiment, point, position, network, seed, axes)
    events(id, run_id, at, kind, path, message)
                                          what happened to a run that its row does
                                          not say (a damaged checkpoint set aside)

A store is checked when opened (:mod:`~covshift.store.damage`): a damaged one is
refused, untouched. SQLite's errors about the file (a full disk, an I/O error, a
read-only file, pages it cannot read) are raised as a :class:`StoreError` that names
the file and says what to do (:mod:`~covshift.store.guard`).

The parts, one concept a module: :mod:`~covshift.store.rows` (rows as Python values),
:mod:`~covshift.store.schema` (tables and migrations), :mod:`~covshift.store.opening`
(checking and opening a file), :mod:`~covshift.store.queries` and
:mod:`~covshift.store.writes` (the two halves of :class:`Store`),
:mod:`~covshift.store.ownership` (which process owns a run).
"""

from __future__ import annotations

import os
from pathlib import Path

from covshift.store.opening import open_store
from covshift.store.writes import StoreWriter

__all__ = ["DEFAULT_DB", "Store"]

DEFAULT_DB = Path("covshift-out") / "covshift.db"


class Store(StoreWriter):
    """A covshift results database.

    Args:
        path: the SQLite file (created with its folder if missing).
        create: False to open only an existing store (reading commands never create
            one, nor write to the file); raises :class:`NoStoreError` when there is
            none (no file, an empty one, or an SQLite file without tables, as a first
            run interrupted while creating the store leaves; a writing open makes such
            a file a store).

    Raises:
        StoreError: the path is a folder or another program's database, the schema is
            newer than this covshift, or the file cannot be written (said as such,
            with the file's name).

    Example:
        >>> store = Store(tmp_path / "covshift.db")
        >>> run = store.start_run("demo", config={"lr": 0.1}, seed=0)
        >>> store.log_scalars(run, step=10, values={"loss": 0.5})
        >>> store.finish_run(run, "finished")
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DB, *, create: bool = True) -> None:
        self.path = Path(path)
        self._db, self.store_id = open_store(self.path, create=create)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files kept beside the store -----------------------------------------
    def checkpoint_path(self, run_id: int) -> Path:
        """Where the resumable state of run ``run_id`` is kept while it trains: beside
        the store, named after the store's identity and the run."""
        return self.path.parent / "checkpoints" / f"{self.store_id[:12]}-run-{run_id}.pt"

    def checkpoint_owner(self, run_id: int) -> str:
        """The identity a checkpoint of run ``run_id`` records, checked when it is loaded
        (the file name alone would not catch a copied or renamed file)."""
        return f"store {self.store_id}/run {run_id}"
