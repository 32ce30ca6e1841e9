"""Datasets by name: :func:`load_dataset` and :func:`dataset_names`.

Each loader module registers its datasets here when it is imported (the package's
``__init__`` imports them all), so the name and the function that makes the dataset
stand side by side.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from covshift.data.dataset import Dataset, DatasetError

__all__ = ["dataset_names", "is_sequence_dataset", "load_dataset"]

DatasetLoader = Callable[..., Dataset]
_LOADERS: dict[str, DatasetLoader] = {}
# Datasets of byte sequences (covshift.data.text): their loaders take ``context``.
_SEQUENCE: set[str] = set()


def _register(name: str, *, sequence: bool = False) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make ``loader`` the one :func:`load_dataset` calls for ``name``;
    ``sequence``: a text dataset, whose loader takes the window length ``context``."""

    def decorate(loader: DatasetLoader) -> DatasetLoader:
        _LOADERS[name] = loader
        if sequence:
            _SEQUENCE.add(name)
        return loader

    return decorate


def is_sequence_dataset(name: str) -> bool:
    """Whether dataset ``name`` is byte-level text (windows of ``context`` bytes, for a
    language model), known before it is loaded."""
    return name in _SEQUENCE


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_LOADERS)


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, **kw: object
) -> Dataset:
    """Load a dataset by name.

    Args:
        name: ``fashion-mnist`` (default folder /usr/share/datasets/fashion-mnist, from
            Debian's ``dataset-fashion-mnist``), ``mnist`` (a folder you name), or
            ``synthetic`` (generated; keyword arguments: n_train, n_test, num_features,
            num_classes, seed); text for language models (:mod:`covshift.data.text`,
            keyword ``context``: bytes per window): ``world-english-bible`` (from
            Debian's ``sword-text-web``) and ``synthetic-text`` (generated).
        data_dir: folder with the four IDX files; defaults to ``$COVSHIFT_DATA_DIR``,
            then to the dataset's standard place.
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise DatasetError(
            f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}"
        ) from None
    return loader(data_dir=data_dir, **kw)
