"""Datasets: an IDX reader, a name registry, and seeded synthetic data.

Every dataset lives in memory as one tensor per split (images flattened to
``(N, 784)`` float32 in [0, 1], labels int64); batches are index draws from a seeded
generator (:class:`BatchSampler`), so there is no DataLoader overhead and two
networks can be fed exactly the same batches.

One concept a module:

- :mod:`.dataset`: :class:`Dataset`, :class:`BatchSampler`, :class:`DatasetError`;
- :mod:`.idx`: the IDX file format (:func:`read_idx`, :class:`IdxFormatError`);
- :mod:`.registry`: datasets by name (:func:`load_dataset`, :func:`dataset_names`);
- :mod:`.mnist`: ``fashion-mnist`` and ``mnist``, folders of IDX files;
- :mod:`.generated`: ``synthetic`` and ``linear-regression``, drawn from a seed.

Everything is imported from here (``from covshift.data import load_dataset``).
"""

from covshift.data.dataset import BatchSampler, Dataset, DatasetError

# Importing the loader modules registers their datasets with the registry.
from covshift.data.generated import linear_regression, synthetic
from covshift.data.idx import IdxFormatError, read_idx
from covshift.data.mnist import DATA_DIR_ENV, DEFAULT_FASHION_MNIST_DIR
from covshift.data.registry import dataset_names, load_dataset

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_FASHION_MNIST_DIR",
    "BatchSampler",
    "Dataset",
    "DatasetError",
    "IdxFormatError",
    "dataset_names",
    "linear_regression",
    "load_dataset",
    "read_idx",
    "synthetic",
]
