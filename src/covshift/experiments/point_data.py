"""The datasets of grid points, loaded once per process: :func:`dataset_for`, and the
shared-memory copies handed to pool workers (:func:`shared_datasets`,
:func:`preload_datasets`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from covshift.data import Dataset, is_sequence_dataset, load_dataset
from covshift.experiments.grid import PointSpec
from covshift.training import resolve_device

__all__ = ["DatasetKey", "dataset_arguments", "dataset_for", "preload_datasets", "shared_datasets"]

DatasetKey = tuple[str, str | None, str, int | None]
_DATASETS: dict[DatasetKey, Dataset] = {}


def dataset_arguments(spec: PointSpec) -> dict[str, Any]:
    """:func:`~covshift.data.load_dataset`'s keyword arguments for the point: the
    window length (``model.context``) of a text dataset, none for the others."""
    return {"context": spec.model.context} if is_sequence_dataset(spec.dataset) else {}


def _dataset_key(spec: PointSpec, device: str) -> DatasetKey:
    return (spec.dataset, spec.data_dir, device, dataset_arguments(spec).get("context"))


def dataset_for(spec: PointSpec, device: torch.device | None = None) -> Dataset:
    """The point's dataset on its device, loaded once per process and kept."""
    dev = device or resolve_device(spec.device)
    key = _dataset_key(spec, str(dev))
    if key not in _DATASETS:
        loaded = load_dataset(spec.dataset, spec.data_dir, **dataset_arguments(spec))
        _DATASETS[key] = loaded.to(dev)
    return _DATASETS[key]


def shared_datasets(points: Sequence[Any]) -> dict[DatasetKey, Dataset]:
    """The CPU datasets of ``points``, their tensors moved to shared memory, to hand to
    worker processes (which then map them instead of reading and decoding the files)."""
    out: dict[DatasetKey, Dataset] = {}
    cpu = torch.device("cpu")
    for point in points:
        spec = point.spec
        key = _dataset_key(spec, "cpu")
        if key in out or resolve_device(spec.device) != cpu:
            continue
        data = dataset_for(spec, cpu)
        for tensor in (data.x_train, data.y_train, data.x_test, data.y_test):
            tensor.share_memory_()
        out[key] = data
    return out


def preload_datasets(datasets: dict[DatasetKey, Dataset]) -> None:
    """Put datasets received from the driver into this process's cache."""
    _DATASETS.update(datasets)
