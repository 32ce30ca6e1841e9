"""Experiments recorded before sweeps (store schema 1): adopted into the grid model.

A covshift 0.1 run kept its experiment's whole configuration in its ``config``
column, with one network per run and a single seed. Asked for such an experiment,
covshift re-expands that configuration into grid points, gives each old run the
identity of its point (when no other run holds it already; finished runs first) and
records the experiment, so that its report, its claims and a resumed run work as for
any sweep. Nothing is rewritten but the ``point`` column.
"""

from __future__ import annotations

from typing import Any

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import expand_grid
from covshift.store import ExperimentPoint, Store

__all__ = ["adopt_legacy_experiment"]


def adopt_legacy_experiment(store: Store, experiment_id: str) -> dict[str, Any] | None:
    """Adopt the schema-1 runs of ``experiment_id``; its configuration, or None."""
    legacy = [
        r
        for r in store.runs(experiment=experiment_id)
        if r.point is None and isinstance(r.config.get("experiment"), dict)
    ]
    if not legacy:
        return None
    config = ExperimentConfig.model_validate(legacy[0].config["experiment"])
    points = expand_grid(config)
    by_network = {(p.network, p.seed): p for p in points}
    finished_first = sorted(legacy, key=lambda r: (r.status != "finished", r.id))
    for run in finished_first:
        point = by_network.get((run.config.get("network"), run.seed))
        if point is not None:
            store.adopt_point(run.id, point.id)
    store.save_experiment(
        experiment_id,
        config.name,
        config.model_dump(mode="json"),
        [ExperimentPoint(p.id, p.position, p.network, p.seed, p.axes) for p in points],
    )
    return config.model_dump(mode="json")
