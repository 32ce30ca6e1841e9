"""The IDX reader, the dataset registry and the batch sampler."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from covshift.data import (
    DATA_DIR_ENV,
    BatchSampler,
    DatasetError,
    IdxFormatError,
    load_dataset,
    read_idx,
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    return header + array.astype(dtype).tobytes()


def write_idx_folder(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in files.items():
        raw = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("type_code", [0x08, 0x0B, 0x0D])
def test_read_idx_round_trip(tmp_path: Path, gz: bool, type_code: int) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    raw = idx_bytes(array, type_code)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = read_idx(path)
    np.testing.assert_array_equal(out, array)
    assert out.dtype.isnative


def test_read_idx_truncated_names_file_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "t.idx"
    path.write_bytes(idx_bytes(np.zeros((5, 4), np.uint8))[:-3])
    with pytest.raises(IdxFormatError, match=r"t\.idx: truncated: header says \(5, 4\).*17"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "t.idx"
    path.write_bytes(idx_bytes(np.zeros((5,), np.uint8)) + b"xx")
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        read_idx(path)


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "foreign.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(IdxFormatError, match=r"foreign\.png: bad magic number 0x89504e47"):
        read_idx(path)


def test_read_idx_bad_gzip(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:20])
    with pytest.raises(IdxFormatError, match=r"broken\.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_read_idx_corrupt_deflate_data(tmp_path: Path) -> None:
    """Flipped bytes inside the deflate stream raise zlib.error, not OSError."""
    packed = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)), mtime=0))
    for i in range(12, 30):
        packed[i] ^= 0xFF
    path = tmp_path / "flipped.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(IdxFormatError, match=r"flipped\.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_read_idx_huge_header_sizes_do_not_wrap(tmp_path: Path) -> None:
    """Sizes whose product overflows 64 bits must not match a short payload."""
    dims = (2**32 - 1, 2**32 - 1, 2**32 - 1)
    header = bytes([0, 0, 0x08, len(dims)]) + np.array(dims, dtype=">u4").tobytes()
    path = tmp_path / "huge"
    path.write_bytes(header + b"\0" * 16)
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(path)


def test_read_idx_too_short(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"\0\0")
    with pytest.raises(IdxFormatError, match="too short"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_folder(tmp_path: Path, gz: bool) -> None:
    write_idx_folder(tmp_path / "m", gz=gz)
    data = load_dataset("mnist", tmp_path / "m")
    assert data.x_train.shape == (20, 784) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (10, 784) and data.y_test.dtype == torch.int64
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert data.image_shape == (1, 28, 28)
    raw = read_idx(tmp_path / "m" / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    np.testing.assert_allclose(data.x_train[3].numpy(), raw[3].reshape(-1) / 255.0, rtol=1e-6)


def test_mnist_missing_file_names_file_and_folder(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\(\.gz\) not found in .*m"):
        load_dataset("mnist", tmp_path / "m")


def test_mnist_needs_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist")


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_folder(tmp_path / "env")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert len(load_dataset("fashion-mnist").x_train) == 20


def test_mismatched_labels(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "m")
    (tmp_path / "m" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(7, np.uint8)))
    )
    with pytest.raises(IdxFormatError, match=r"train images \(20, 28, 28\) and labels \(7,\)"):
        load_dataset("mnist", tmp_path / "m")


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        (
            "t10k-images-idx3-ubyte",
            np.zeros((10, 32, 32), np.uint8),
            r"test images are \(32, 32\) pixels but training images are \(28, 28\)",
        ),
        (
            "t10k-labels-idx1-ubyte",
            np.array([0, 1, 2, 3, 4, 5, 6, 7, 12, 200], np.uint8),
            r"test labels \[12, 200\] are outside the training labels 0 \.\. 9",
        ),
    ],
)
def test_splits_that_do_not_fit_each_other(
    tmp_path: Path, name: str, array: np.ndarray, message: str
) -> None:
    write_idx_folder(tmp_path / "m")
    (tmp_path / "m" / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    with pytest.raises(IdxFormatError, match=message):
        load_dataset("mnist", tmp_path / "m")


def test_training_labels_with_a_gap_are_refused(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "m")
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2, np.uint8)
    labels[3] = 200  # one corrupt byte would make a 201-way classifier
    (tmp_path / "m" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(
        IdxFormatError, match=r"run up to 200 but never use 190 of those 201 classes \(\[10, 11,"
    ):
        load_dataset("mnist", tmp_path / "m")


def test_images_must_be_bytes(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "m")
    images = np.zeros((20, 28, 28), np.float32)
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(images, 0x0D))
    )
    with pytest.raises(IdxFormatError, match="train images are float32 and labels uint8"):
        load_dataset("mnist", tmp_path / "m")


def test_unknown_dataset() -> None:
    with pytest.raises(
        DatasetError, match="choose one of: fashion-mnist, linear-regression, mnist, synthetic"
    ):
        load_dataset("cifar")


def test_synthetic_is_seeded_and_learnable_shape() -> None:
    a = load_dataset("synthetic", n_train=50, n_test=20, seed=1)
    b = load_dataset("synthetic", n_train=50, n_test=20, seed=1)
    c = load_dataset("synthetic", n_train=50, n_test=20, seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.image_shape == (1, 28, 28)
    # Examples sit closer to their own class prototype than to others (learnable).
    centroids = torch.stack([a.x_train[a.y_train == k].mean(0) for k in a.y_train.unique()])
    nearest = torch.cdist(a.x_train, centroids).argmin(1)
    assert (a.y_train.unique()[nearest] == a.y_train).float().mean() > 0.9


def test_synthetic_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="n_train must be >= 1"):
        load_dataset("synthetic", n_train=0)


def test_batch_sampler_epochs_and_seed() -> None:
    s1, s2 = BatchSampler(10, 3, seed=5), BatchSampler(10, 3, seed=5)
    first = [s1.next() for _ in range(3)]  # one epoch: 3 full batches, 1 example dropped
    assert all(torch.equal(a, s2.next()) for a in first)
    seen = torch.cat(first)
    assert len(seen.unique()) == 9
    s1.next()  # new epoch, new permutation
    state = s1.state_dict()
    after = s1.next()
    s3 = BatchSampler(10, 3, seed=0)
    s3.load_state_dict(state)
    assert torch.equal(s3.next(), after)


def _draws(sampler: BatchSampler, n: int) -> list[torch.Tensor]:
    return [sampler.next() for _ in range(n)]


@pytest.mark.parametrize("taken", [0, 1, 3, 4, 7])  # before, inside and at epoch edges
def test_batch_sampler_resumes_from_its_state_at_any_step(taken: int) -> None:
    reference = BatchSampler(10, 3, seed=11)
    expected = _draws(reference, taken + 8)[taken:]  # crosses two more epochs
    sampler = BatchSampler(10, 3, seed=11)
    _draws(sampler, taken)
    state = sampler.state_dict()
    resumed = BatchSampler(10, 3, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_draws(resumed, 8), expected, strict=True))
    # and its own state, saved again after the resume, resumes the same way
    again = BatchSampler(10, 3, seed=1)
    again.load_state_dict(resumed.state_dict())
    assert torch.equal(again.next(), reference.next())


def test_batch_sampler_state_does_not_carry_the_permutation() -> None:
    sampler = BatchSampler(1_000_000, 16, seed=0)
    sampler.next()
    state = sampler.state_dict()
    sizes = [v.numel() for v in state.values() if isinstance(v, torch.Tensor)]
    assert max(sizes) < 10_000  # the generator's state, not 1,000,000 indices


def test_batch_sampler_resumes_a_state_saved_with_its_permutation() -> None:
    # The state checkpoints carried before 2026-12-06: the generator after the draw,
    # the permutation itself and the position in it.
    reference = BatchSampler(10, 3, seed=4)
    _draws(reference, 4)  # into the second epoch
    generator = torch.Generator().manual_seed(4)
    torch.randperm(10, generator=generator)
    perm = torch.randperm(10, generator=generator)
    old = {"generator": generator.get_state(), "perm": perm, "pos": 3}
    resumed = BatchSampler(10, 3, seed=0)
    resumed.load_state_dict(old)
    assert all(
        torch.equal(a, b) for a, b in zip(_draws(resumed, 6), _draws(reference, 6), strict=True)
    )
    # saved again inside that epoch (the old form is kept), then resumed: still exact
    first, second = BatchSampler(10, 3, seed=0), BatchSampler(10, 3, seed=0)
    first.load_state_dict(old)
    second.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_draws(second, 5), _draws(first, 5), strict=True))


def test_batch_sampler_rejects_bad_batch() -> None:
    with pytest.raises(ValueError, match="batch_size must be between 1 and the number"):
        BatchSampler(5, 6, seed=0)
