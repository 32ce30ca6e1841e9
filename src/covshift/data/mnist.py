"""The MNIST-format datasets: ``fashion-mnist`` and ``mnist``, each a folder of four
IDX files (raw or gzipped) with the standard names.

The folder is the one passed (``--data-dir``), else ``$COVSHIFT_DATA_DIR``, else the
dataset's standard place (Fashion-MNIST only: Debian's ``dataset-fashion-mnist``).
The files are checked against one another (shapes, byte values, labels 0 .. C-1),
since a mismatch would otherwise train a silently wrong classifier.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from covshift.data.dataset import Dataset, DatasetError
from covshift.data.idx import IdxFormatError, read_idx
from covshift.data.registry import _register

__all__ = ["DATA_DIR_ENV", "DEFAULT_FASHION_MNIST_DIR"]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "COVSHIFT_DATA_DIR"

# The standard file names of MNIST and Fashion-MNIST (both use the same names).
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(folder: Path, stem: str, dataset: str) -> Path:
    if folder.exists() and not folder.is_dir():
        raise DatasetError(
            f"{dataset}: {folder} is a file, not a folder; point --data-dir or "
            f"${DATA_DIR_ENV} at the folder holding the four IDX files "
            f"({', '.join(_IDX_FILES.values())}), raw or .gz"
        )
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    hint = (
        "install Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist) or "
        if dataset == "fashion-mnist"
        else ""
    )
    raise DatasetError(
        f"{dataset}: file {stem}(.gz) not found in {folder}; {hint}point --data-dir or "
        f"${DATA_DIR_ENV} at the folder holding the four IDX files "
        f"({', '.join(_IDX_FILES.values())})"
    )


def _load_idx_folder(folder: Path, dataset: str) -> Dataset:
    arrays = {key: read_idx(_find_idx(folder, stem, dataset)) for key, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise IdxFormatError(
                f"{folder}: {split} images {images.shape} and labels {labels.shape} do not "
                "match: expected (N, H, W) images and (N,) labels"
            )
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise IdxFormatError(
                f"{folder}: {split} images are {images.dtype} and labels {labels.dtype}; "
                "MNIST-format files hold unsigned bytes (IDX type 0x08) for both"
            )
    height, width = arrays["train_images"].shape[1:]
    if arrays["test_images"].shape[1:] != (height, width):
        raise IdxFormatError(
            f"{folder}: test images are {arrays['test_images'].shape[1:]} pixels but training "
            f"images are {(height, width)}; both splits must have images of one size"
        )
    classes = int(arrays["train_labels"].max()) + 1
    # The head has max(label) + 1 outputs: a corrupt label (200 among 0 .. 9) would
    # silently make a 201-way classifier. A class or two absent from a small set is
    # normal; most of them absent is not.
    missing = sorted(set(range(classes)) - set(np.unique(arrays["train_labels"]).tolist()))
    if len(missing) * 2 > classes:
        raise IdxFormatError(
            f"{folder}: the training labels run up to {classes - 1} but never use "
            f"{len(missing)} of those {classes} classes ({missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}); labels must be the classes 0 .. C-1 "
            "(a corrupt label file?)"
        )
    unseen = sorted(set(np.unique(arrays["test_labels"]).tolist()) - set(range(classes)))
    if unseen:
        raise IdxFormatError(
            f"{folder}: test labels {unseen[:10]} are outside the training labels 0 .. "
            f"{classes - 1}; a test label must be one of the training classes"
        )

    def images(a: np.ndarray) -> torch.Tensor:  # (N, H, W) uint8 -> (N, H*W) float32 in [0, 1]
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    y_train = labels(arrays["train_labels"])
    return Dataset(
        name=dataset,
        x_train=images(arrays["train_images"]),
        y_train=y_train,
        x_test=images(arrays["test_images"]),
        y_test=labels(arrays["test_labels"]),
        num_classes=classes,
        image_shape=(1, int(height), int(width)),
        source=str(folder),
    )


def _resolve_dir(data_dir: str | os.PathLike[str] | None, default: Path | None, name: str) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    if default is None:
        raise DatasetError(
            f"{name}: no folder given; pass --data-dir (or set ${DATA_DIR_ENV}) to the folder "
            f"holding {', '.join(_IDX_FILES.values())} (raw or .gz)"
        )
    return default


@_register("fashion-mnist")
def _fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    return _load_idx_folder(
        _resolve_dir(data_dir, DEFAULT_FASHION_MNIST_DIR, "fashion-mnist"), "fashion-mnist"
    )


@_register("mnist")
def _mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    return _load_idx_folder(_resolve_dir(data_dir, None, "mnist"), "mnist")
