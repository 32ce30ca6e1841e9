"""What a dataset is in memory (:class:`Dataset`, one tensor per split), and how
mini-batches are drawn from it (:class:`BatchSampler`: seeded index draws, so that two
networks can be fed exactly the same batches without a DataLoader).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BatchSampler", "Dataset", "DatasetError"]


class DatasetError(Exception):
    """A dataset cannot be found or loaded; the message says where and what to do."""


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

    Its state (:meth:`state_dict`) is the generator's state from before the epoch's
    permutation was drawn and the position in it, not the permutation itself: a
    permutation of a text corpus's 4.5 million windows is 36 MB, which every checkpoint
    carried; :meth:`load_state_dict` draws the same permutation again from that state.
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
        self._drawn_from: torch.Tensor | None = None  # generator state before _perm

    def next(self) -> torch.Tensor:
        """Indices of the next batch, shape ``(batch_size,)``, int64 on the CPU."""
        if self._pos + self.batch_size > len(self._perm):
            self._drawn_from = self._generator.get_state()
            self._perm = torch.randperm(self.num_examples, generator=self._generator)
            self._pos = 0
        batch = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return batch

    def state_dict(self) -> dict[str, object]:
        if self._drawn_from is not None:
            return {"generator": self._drawn_from, "pos": self._pos, "drawn": True}
        state = {"generator": self._generator.get_state(), "pos": self._pos}
        if len(self._perm):  # resumed from an old checkpoint's permutation: keep it
            state["perm"] = self._perm
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._generator.set_state(state["generator"])  # type: ignore[arg-type]
        self._pos = int(state["pos"])  # type: ignore[arg-type]
        self._drawn_from = None
        if state.get("drawn"):  # draw the epoch's permutation again, as next() did
            self._drawn_from = self._generator.get_state()
            self._perm = torch.randperm(self.num_examples, generator=self._generator)
        elif "perm" in state:  # a checkpoint saved with its permutation (before 2026-12-06)
            self._perm = state["perm"]  # type: ignore[assignment]
        else:
            self._perm = torch.empty(0, dtype=torch.int64)
