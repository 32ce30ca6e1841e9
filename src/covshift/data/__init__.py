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
- :mod:`.generated`: ``synthetic`` and ``linear-regression``, drawn from a seed;
- :mod:`.text`: byte-level text for language models (:class:`TextDataset`), served
  by :mod:`.bible` (``world-english-bible``) and :mod:`.synthetic_text`
  (``synthetic-text``).

Everything is imported from here (``from covshift.data import load_dataset``).
"""

from covshift.data.bible import DEFAULT_WEB_DIR
from covshift.data.dataset import BatchSampler, Dataset, DatasetError

# Importing the loader modules registers their datasets with the registry.
from covshift.data.generated import linear_regression, synthetic
from covshift.data.idx import IdxFormatError, read_idx
from covshift.data.mnist import DATA_DIR_ENV, DEFAULT_FASHION_MNIST_DIR
from covshift.data.registry import dataset_names, is_sequence_dataset, load_dataset
from covshift.data.synthetic_text import synthetic_text
from covshift.data.text import VOCAB_SIZE, TextDataset, is_text

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_FASHION_MNIST_DIR",
    "DEFAULT_WEB_DIR",
    "VOCAB_SIZE",
    "BatchSampler",
    "Dataset",
    "DatasetError",
    "IdxFormatError",
    "TextDataset",
    "dataset_names",
    "is_sequence_dataset",
    "is_text",
    "linear_regression",
    "load_dataset",
    "read_idx",
    "synthetic",
    "synthetic_text",
]
