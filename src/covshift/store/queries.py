"""Reading the store: runs, experiments, scalar series and probe records.

:class:`StoreReader` is the reading half of :class:`~covshift.store.Store`; nothing
here writes. Runs come back as :class:`~covshift.store.rows.RunInfo`, newest first, a
run whose owner died on this host reported as ``stale``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covshift.store.errors import StoreError
from covshift.store.guard import GuardedConnection
from covshift.store.ownership import marked_stale
from covshift.store.rows import SELECT_RUNS, Event, ExperimentPoint, ProbeUnits, RunInfo

__all__ = ["StoreReader"]


class StoreReader:
    """The queries of a store; :class:`~covshift.store.Store` opens the connection."""

    path: Path
    _db: GuardedConnection

    # -- runs ----------------------------------------------------------------
    def _select_runs(self, where: str = "", args: Sequence[Any] = ()) -> list[RunInfo]:
        rows = self._db.execute(f"{SELECT_RUNS} {where} ORDER BY id DESC", tuple(args)).fetchall()
        return [marked_stale(RunInfo.from_row(r)) for r in rows]

    def runs(self, experiment: str | None = None) -> list[RunInfo]:
        """All runs, newest first (optionally those of one experiment: the runs of its
        grid points, and legacy runs recorded with its id).

        A run still marked ``running`` whose process is gone on this host is reported
        with status ``stale`` (it was killed without a chance to close itself).
        """
        if experiment is None:
            return self._select_runs()
        return self._select_runs(
            "WHERE experiment = ? OR point IN"
            " (SELECT point FROM experiment_points WHERE experiment = ?)",
            (experiment, experiment),
        )

    def run(self, run_id: int) -> RunInfo:
        found = self._select_runs("WHERE id = ?", (run_id,))
        if not found:
            raise StoreError(f"{self.path}: no run with id {run_id}")
        return found[0]

    def runs_of_points(self, points: Sequence[str]) -> dict[str, RunInfo]:
        """The run recorded for each of ``points`` that has one."""
        out: dict[str, RunInfo] = {}
        chunk = 500  # SQLite's limit on bound parameters is 999 on old builds
        for i in range(0, len(points), chunk):
            part = list(points[i : i + chunk])
            marks = ", ".join("?" * len(part))
            for run in self._select_runs(f"WHERE point IN ({marks})", part):
                out[run.point] = run  # type: ignore[index]
        return out

    def events(self, run_id: int | None = None, *, after: int = 0) -> list[Event]:
        """Events recorded for the runs (or for run ``run_id``), oldest first; ``after``:
        only those with a larger id (the ones recorded since)."""
        where, args = "WHERE id > ?", [after]
        if run_id is not None:
            where, args = where + " AND run_id = ?", [after, run_id]
        rows = self._db.execute(
            f"SELECT id, run_id, at, kind, path, message FROM events {where} ORDER BY id", args
        ).fetchall()
        return [Event(*row) for row in rows]

    # -- experiments ---------------------------------------------------------
    def experiment_config(self, experiment_id: str) -> dict[str, Any] | None:
        """The configuration an experiment was saved with (None: not recorded)."""
        row = self._db.execute(
            "SELECT config FROM experiments WHERE id = ?", (experiment_id,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def experiment_points(self, experiment_id: str) -> list[ExperimentPoint]:
        """The grid of a recorded experiment, in grid order."""
        rows = self._db.execute(
            "SELECT point, position, network, seed, axes FROM experiment_points"
            " WHERE experiment = ? ORDER BY position",
            (experiment_id,),
        ).fetchall()
        return [ExperimentPoint(p, pos, n, s, json.loads(a)) for p, pos, n, s, a in rows]

    def experiments(self) -> list[tuple[str, str, str]]:
        """``(id, name, created_at)`` of every recorded experiment, newest first (ties
        of the one-second timestamp broken by the order they were recorded in)."""
        return [
            tuple(r)  # type: ignore[misc]
            for r in self._db.execute(
                "SELECT id, name, created_at FROM experiments ORDER BY created_at DESC, rowid DESC"
            )
        ]

    # -- series and probe records --------------------------------------------
    def scalars(self, run_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one scalar series, ordered by step."""
        rows = self._db.execute(
            "SELECT step, value FROM scalars WHERE run_id = ? AND name = ? ORDER BY step",
            (run_id, name),
        ).fetchall()
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        values = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        return steps, values

    def scalar_names(self, run_id: int) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT name FROM scalars WHERE run_id = ? ORDER BY name", (run_id,)
        )
        return [r[0] for r in rows]

    def probe_layers(self, run_id: int) -> list[str]:
        """Layers with probe records, in the order they were first recorded."""
        rows = self._db.execute(
            "SELECT layer, MIN(rowid) AS first FROM probe_records WHERE run_id = ?"
            " GROUP BY layer ORDER BY first",
            (run_id,),
        )
        return [r[0] for r in rows]

    def probe_stats(self, run_id: int, layer: str) -> list[str]:
        """The statistics recorded for ``layer`` in a run, sorted."""
        rows = self._db.execute(
            "SELECT DISTINCT stat FROM probe_records WHERE run_id = ? AND layer = ? ORDER BY stat",
            (run_id, layer),
        )
        return [r[0] for r in rows]

    def probe_units(self, run_id: int, layer: str) -> list[ProbeUnits]:
        """Per record of ``layer`` (by step): the axis that held its units and how it
        was found. Records made before schema 3 (and records that are not per unit)
        have None there."""
        rows = self._db.execute(
            "SELECT step, MIN(unit_dim), MIN(unit_source), MIN(unit_rule) FROM probe_records"
            " WHERE run_id = ? AND layer = ? GROUP BY step ORDER BY step",
            (run_id, layer),
        ).fetchall()
        return [ProbeUnits(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def probe(self, run_id: int, layer: str, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)``: one statistic of one layer over its records, stacked to
        shape ``(records, *per_record_shape)``."""
        rows = self._db.execute(
            "SELECT step, dtype, shape, data FROM probe_records"
            " WHERE run_id = ? AND layer = ? AND stat = ? ORDER BY step",
            (run_id, layer, stat),
        ).fetchall()
        if not rows:
            raise StoreError(
                f"{self.path}: run {run_id} has no probe records of {layer!r}/{stat!r}"
            )
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        arrays = [np.frombuffer(r[3], dtype=np.dtype(r[1])).reshape(json.loads(r[2])) for r in rows]
        return steps, np.stack(arrays)
