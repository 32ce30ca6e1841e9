"""Datasets: an IDX reader, a name registry, and seeded synthetic data.

The IDX format (LeCun et al., used by MNIST and Fashion-MNIST) is a big-endian
header ``0x00 0x00 <type code> <ndim>`` followed by ``ndim`` 32-bit sizes and the
raw values. Files may be gzipped. Every dataset lives in memory as one tensor
(images flattened to ``(N, 784)`` float32 in [0, 1], labels int64); batches are
index draws from a seeded generator (:class:`BatchSampler`), so there is no
DataLoader overhead and two networks can be fed exactly the same batches.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "BatchSampler",
    "Dataset",
    "DatasetError",
    "IdxFormatError",
    "dataset_names",
    "load_dataset",
    "read_idx",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "COVSHIFT_DATA_DIR"

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The standard file names of MNIST and Fashion-MNIST (both use the same names).
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DatasetError(Exception):
    """A dataset cannot be found or loaded; the message says where and what to do."""


class IdxFormatError(DatasetError, ValueError):
    """A file is not a valid IDX file (foreign, truncated, or with trailing bytes)."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian numpy array.

    Checks the magic number (two zero bytes, a known type code, ndim >= 1), that the
    dimensions are positive, and that the payload has exactly ``prod(dims)`` values.

    Raises:
        IdxFormatError: naming the file and what is wrong with it.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            try:
                raw = gzip.decompress(f.read())
            except (OSError, EOFError, zlib.error) as e:
                raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from None
        else:
            raw = f.read()
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header (4 bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: bad magic number 0x{raw[:4].hex()}; an IDX file starts with 0x0000 then a "
            f"type code ({', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}) and ndim >= 1"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxFormatError(f"{path}: truncated header: needs {ndim} dimension sizes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if any(d == 0 for d in dims):
        raise IdxFormatError(f"{path}: dimension sizes {dims} contain a zero")
    dtype = _IDX_DTYPES[type_code]
    # Python integers: a product of header sizes cannot overflow (np.prod of uint32
    # wraps around and could match a short payload).
    expected = math.prod(dims) * dtype.itemsize
    payload = len(raw) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: {what}: header says {dims} x {dtype.itemsize} bytes = {expected} bytes of "
            f"data, file has {payload}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


@dataclass(frozen=True)
class Dataset:
    """An in-memory classification dataset.

    Attributes:
        name: registry name (``fashion-mnist``, ``mnist``, ``synthetic``).
        x_train: ``(N, D)`` float32 features.
        y_train: ``(N,)`` int64 labels in ``[0, num_classes)``.
        x_test, y_test: the held-out split, same layout.
        num_classes: number of labels.
        image_shape: ``(C, H, W)`` for image data (so CNNs can reshape), else None.
        source: where the data came from (a folder, or the generator's settings).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int, int] | None
    source: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def is_regression(self) -> bool:
        """True when the targets are real vectors ``(N, K)`` (trained with squared
        error) rather than class labels."""
        return bool(self.y_train.is_floating_point())

    def first_test(self, n: int | None) -> Dataset:
        """The same dataset with only the first ``n`` test examples (views, no copy);
        itself when ``n`` is None or covers the whole test set."""
        if n is None or n >= len(self.x_test):
            return self
        return Dataset(
            self.name,
            self.x_train,
            self.y_train,
            self.x_test[:n],
            self.y_test[:n],
            num_classes=self.num_classes,
            image_shape=self.image_shape,
            source=f"{self.source}, first {n} test examples",
        )

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor on ``device`` (one copy, done once)."""
        move = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return Dataset(
            self.name,
            **move,
            num_classes=self.num_classes,
            image_shape=self.image_shape,
            source=self.source,
        )


class BatchSampler:
    """Seeded mini-batch index draws: a fresh permutation per epoch, cut into batches.

    Two samplers with the same ``(num_examples, batch_size, seed)`` yield the same
    batches, which is how two networks in one experiment see identical data. The
    last partial batch of an epoch is dropped so every step has ``batch_size`` rows.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= num_examples:
            raise ValueError(
                f"batch_size must be between 1 and the number of examples ({num_examples}), "
                f"got {batch_size}"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    def next(self) -> torch.Tensor:
        """Indices of the next batch, shape ``(batch_size,)``, int64 on the CPU."""
        if self._pos + self.batch_size > len(self._perm):
            self._perm = torch.randperm(self.num_examples, generator=self._generator)
            self._pos = 0
        batch = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return batch

    def state_dict(self) -> dict[str, object]:
        return {"generator": self._generator.get_state(), "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._generator.set_state(state["generator"])  # type: ignore[arg-type]
        self._perm = state["perm"]  # type: ignore[assignment]
        self._pos = int(state["pos"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Registry

DatasetLoader = Callable[..., Dataset]
_LOADERS: dict[str, DatasetLoader] = {}


def _register(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def decorate(loader: DatasetLoader) -> DatasetLoader:
        _LOADERS[name] = loader
        return loader

    return decorate


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
            num_classes, seed).
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


@_register("synthetic")
def synthetic(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_train: int = 6000,
    n_test: int = 1000,
    num_features: int = 784,
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """A seeded, learnable stand-in for an image dataset (for tests and quick tries).

    Each class has a random prototype in [0, 1]^D; an example is its class prototype
    blended with uniform noise, ``x = clip(0.6 * p_y + 0.4 * u, 0, 1)``, so pixel
    statistics resemble MNIST's range while the task stays learnable by an MLP.
    ``data_dir`` is ignored.
    """
    for arg, value in {"n_train": n_train, "n_test": n_test, "num_features": num_features}.items():
        if value < 1:
            raise ValueError(f"synthetic dataset: {arg} must be >= 1, got {value}")
    if num_classes < 2:
        raise ValueError(f"synthetic dataset: num_classes must be >= 2, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, num_features, generator=g)  # (K, D)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.6 * prototypes[y] + 0.4 * torch.rand(n, num_features, generator=g)
        return x.clamp_(0.0, 1.0), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    side = round(num_features**0.5)
    image_shape = (1, side, side) if side * side == num_features else None
    return Dataset(
        "synthetic",
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes,
        image_shape,
        source=f"synthetic(seed={seed}, n_train={n_train}, n_test={n_test}, "
        f"num_features={num_features}, num_classes={num_classes})",
    )


@_register("linear-regression")
def linear_regression(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    dim: int = 10,
    seed: int = 0,
) -> Dataset:
    """Santurkar et al. 2018's deep-linear-network task: fit ``y = A x``.

    ``A`` is a random ``dim x dim`` matrix with N(0, 1) entries and ``x ~ N(0, I)``
    (Santurkar, Tsipras, Ilyas, Madry 2018, arXiv 1805.11604, Sec. 2.2: a 25-layer
    deep linear network trained on ``||W_25 ... W_1 x - A x||^2``). The targets are
    real vectors, so covshift trains with the squared error summed over outputs and
    averaged over examples, and evaluations report ``test_loss`` only. The same
    ``seed`` gives the same ``A`` and examples; ``data_dir`` is ignored.
    """
    for arg, value in {"n_train": n_train, "n_test": n_test, "dim": dim}.items():
        if value < 1:
            raise ValueError(f"linear-regression dataset: {arg} must be >= 1, got {value}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g)  # (K, D)
    x_train = torch.randn(n_train, dim, generator=g)
    x_test = torch.randn(n_test, dim, generator=g)
    return Dataset(
        "linear-regression",
        x_train,
        x_train @ a.T,
        x_test,
        x_test @ a.T,
        dim,
        None,
        source=f"linear-regression(seed={seed}, n_train={n_train}, n_test={n_test}, dim={dim})",
    )
